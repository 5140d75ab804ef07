"""A training peer for the reliability tests: ``core_peer``'s model and barriers, plus fault hooks and leave/resume.

Faults (each a flag): SIGKILL right after a collaborative step, SIGKILL inside an all-reduce, an averager that
stalls longer than ``averaging_timeout`` at one step, a peer that dies while serving its state to a joiner, NaN
gradients at one step, a round that fails on this peer only.
Lifecycle: ``--hold`` waits after ``--steps`` (optimizer, averager and DHT alive) until a
signal; ``--steps 0`` trains until a signal. SIGINT (Python's default handler, i.e. ``KeyboardInterrupt``) and
SIGTERM both make the peer leave cleanly: it saves ``--checkpoint``, shuts down the optimizer and the DHT and writes
its results. ``--resume`` restores a checkpoint before training. Results (``--out``, a torch file) hold per-step
parameters/optimizer state, the samples and participants of each step, and resource samples (RSS, fds, children).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import typing

import psutil
import torch

from collab_core import CollaborativeOptimizer, CollaborativeSettings, start_dht
from collab_core.averager import CollaborativeAverager
from collab_core.collaboration import Collaboration
from tests.peers.core_peer import (
    BALLAST_KEY,
    barrier,
    die_during_allreduce,
    fail_round_after_exchange,
    make_model,
    make_optimizer,
    make_scheduler,
    round_step,
    snapshot,
)


class LeaveRequested(BaseException):
    """Raised in the main thread by the SIGTERM handler: leave cleanly (a BaseException, like KeyboardInterrupt,
    so that no `except Exception` on the way swallows it)."""


def on_sigterm(_signum, _frame) -> None:
    raise LeaveRequested("SIGTERM")


def stall_allreduce(at_step: int, seconds: float) -> None:
    """Test hook: the averager process freezes for ``seconds`` once the group of step ``at_step`` is assembled.

    Patched before the averager process forks, so it runs there. The sleep blocks the averager's event loop (as if
    the machine stalled): hivemind's own all-reduce timeout cannot end it, the groupmates wait for this peer's parts
    until ``averaging_timeout``, and this peer's trainer gives up on the round while the averager is frozen.
    """
    original = CollaborativeAverager._aggregate_with_group
    fired = []

    async def aggregate_after_a_stall(self, group_info, *args, **kwargs):
        if not fired and round_step(self, group_info) == at_step:
            fired.append(True)
            print(f"stall hook: the all-reduce of step {at_step} stalls for {seconds}s", flush=True)
            time.sleep(seconds)  # noqa: ASYNC251 - blocking on purpose: the whole averager process stalls
        return await original(self, group_info, *args, **kwargs)

    CollaborativeAverager._aggregate_with_group = aggregate_after_a_stall


def bad_state_server(after_parts: int) -> None:
    """Test hook: this peer serves its state badly, each time after ``after_parts`` streamed messages.

    The first download it serves ends early but cleanly (a truncated state); the second one ends with a SIGKILL of
    the whole peer (the transfer breaks off).
    """
    original_rpc = CollaborativeAverager.rpc_download_state
    served = []

    async def serve_then_fail(self, _request, _context):
        served.append(True)
        sent = 0
        async for message in original_rpc(self, _request, _context):
            if sent == after_parts and len(served) == 1:
                print(f"serve hook: ending the stream after {sent} parts of the state", flush=True)
                return
            if sent == after_parts:
                print(f"serve hook: SIGKILL after streaming {sent} parts of the state", flush=True)
                os.killpg(os.getpgid(0), signal.SIGKILL)
            yield message
            sent += 1

    # hivemind registers rpc_* handlers by their type hints (and parameter names): keep the original's
    serve_then_fail.__annotations__ = typing.get_type_hints(original_rpc)
    CollaborativeAverager.rpc_download_state = serve_then_fail


def offset_state_priority(offset: float) -> None:
    """Test hook: announce ``step + offset`` as this peer's state-sharing priority (downloads try high ones first).

    The offset is large enough that the order holds even while one peer's announcement lags a step behind.
    """
    original_move_to = Collaboration._move_to

    def move_with_offset(self, step: int, fingerprint: str) -> None:
        original_move_to(self, step, fingerprint)
        self.averager.state_sharing_priority = step + offset

    Collaboration._move_to = move_with_offset


def add_ballast(opt: torch.optim.Optimizer, megabytes: float, seed: int) -> None:
    """Make the shared state ``megabytes`` larger without making the model larger: a tensor in the optimizer state of
    the first parameter, which SGD never reads. Downloads carry it (it is optimizer state); rounds do not (it is no
    gradient). Its content depends on ``seed``: a joiner with another seed holds the donors' only after a download."""
    first = opt.param_groups[0]["params"][0]
    generator = torch.Generator().manual_seed(seed)
    opt.state[first][BALLAST_KEY] = torch.rand(int(megabytes * 1e6) // 4, generator=generator)


def resources() -> dict:
    """This peer's resource use: its own RSS and open fds, and its child processes (DHT, averager, p2p daemons)."""
    me = psutil.Process()
    children = me.children(recursive=True)
    child_rss = 0
    for child in children:
        try:
            child_rss += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return {
        "time": time.monotonic(),
        "rss": me.memory_info().rss,
        "fds": me.num_fds(),
        "threads": me.num_threads(),
        "children": len(children),
        "children_rss": child_rss,
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--peers", type=int, default=1, help="peers at the start barrier")
    parser.add_argument("--finish-peers", type=int, default=0, help="peers at the finish barrier (0: no barrier)")
    parser.add_argument("--steps", type=int, default=0, help="train until this step (0: until SIGINT/SIGTERM)")
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--data-seed", type=int, required=True)
    parser.add_argument("--scheduler", action="store_true")
    parser.add_argument("--compute-seconds", type=float, default=0.03, help="simulated compute per micro-batch")
    parser.add_argument("--steps-after-download", type=int, default=0, help="round steps to take after it")
    parser.add_argument("--join-at-step", type=int, default=0, help="start only once the collaboration is here")
    parser.add_argument("--startup-timeout", type=float, default=30.0)
    parser.add_argument("--hold", action="store_true", help="after --steps, wait (alive) for SIGINT/SIGTERM")
    parser.add_argument("--checkpoint", default="", help="save model + optimizer state_dict here when leaving")
    parser.add_argument("--resume", default="", help="restore this checkpoint before training")
    parser.add_argument("--see-peers", action="store_true", help="after the start barrier, wait until --peers are seen")
    parser.add_argument("--kill-after-step", type=int, default=-1, help="SIGKILL itself right after this step")
    parser.add_argument("--die-at-step", type=int, default=-1, help="SIGKILL itself in the all-reduce of this step")
    parser.add_argument("--stall-at-step", type=int, default=-1, help="stall the all-reduce of this step")
    parser.add_argument("--stall-seconds", type=float, default=0.0)
    parser.add_argument("--bad-state-server", type=int, default=-1, help="truncate, then die while serving state")
    parser.add_argument("--state-priority-offset", type=float, default=0.0, help="serve downloads first/last")
    parser.add_argument("--fail-round-at-step", type=int, default=-1, help="only this peer's round of it fails")
    parser.add_argument("--nan-at-step", type=int, default=-1, help="send NaN gradients toward this step")
    parser.add_argument("--step-file", default="", help="write {'step': local_step} here after each step")
    parser.add_argument("--ballast-mb", type=float, default=0.0, help="make the shared state this much larger")
    parser.add_argument("--ballast-seed", type=int, default=0, help="the ballast's content (a joiner's differs)")
    parser.add_argument("--leave-after-download", action="store_true", help="leave once a state was downloaded")
    return parser.parse_args()


def install_hooks(args: argparse.Namespace) -> None:
    if args.die_at_step >= 0:
        die_during_allreduce(args.die_at_step)
    if args.stall_at_step >= 0:
        stall_allreduce(args.stall_at_step, args.stall_seconds)
    if args.bad_state_server >= 0:
        bad_state_server(args.bad_state_server)
    if args.state_priority_offset:
        offset_state_priority(args.state_priority_offset)
    if args.fail_round_at_step >= 0:
        fail_round_after_exchange(args.fail_round_at_step)


class Recorder:
    """What the tests check, collected while training."""

    def __init__(self, collab: CollaborativeOptimizer):
        self.collab = collab
        self.per_step: dict[int, dict] = {}
        self.round_samples: dict[int, int] = {}
        self.participants: dict[int, set[str]] = {}
        self.lrs_used: dict[int, float] = {}
        self.step_times: dict[int, float] = {collab.local_step: time.monotonic()}
        self.resources = [resources()]
        self.max_peers_seen = 1
        self.calls = 0
        self.start_step = collab.local_step
        self.download_steps: list[int] = []  # the step reached by each state download
        self.longest_call = 0.0  # the longest time one step() call took (waiting for peers included)

    def after_call(self, step_before: int, lr_before: float, downloads_before: int) -> None:
        collab, state = self.collab, self.collab.collaboration_state
        self.calls += 1
        self.max_peers_seen = max(self.max_peers_seen, state.num_peers)
        if collab.local_step == step_before:
            return
        self.per_step[collab.local_step] = snapshot(collab)
        self.step_times[collab.local_step] = time.monotonic()
        self.resources.append(resources())
        if state.state_downloads != downloads_before:
            self.download_steps.append(collab.local_step)
        else:  # took the step in a round (or alone), not by a download
            self.round_samples[step_before] = state.last_round_samples
            self.participants[step_before] = set(state.last_round_participants)
            self.lrs_used[step_before] = lr_before

    def result(self, name: str, peer_id: str, left_by: str) -> dict:
        collab = self.collab
        return {
            "name": name,
            "peer_id": peer_id,
            "left_by": left_by,
            "local_step": collab.local_step,
            "per_step": self.per_step,
            "round_samples": self.round_samples,
            "participants": self.participants,
            "lrs_used": self.lrs_used,
            "step_times": self.step_times,
            "resources": self.resources,
            "max_peers_seen": self.max_peers_seen,
            "calls": self.calls,
            "longest_call": self.longest_call,
            "download_steps": self.download_steps,
            "final": snapshot(collab),
            "final_lr": collab.param_groups[0]["lr"],
            "collaboration_state": collab.collaboration_state.__dict__,
            "target_batch_size": collab.target_batch_size,
        }


def save_atomically(obj, path: str) -> None:
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def finished(args, collab: CollaborativeOptimizer, recorder: Recorder) -> bool:
    """``--steps`` reached, or ``--steps-after-download`` steps taken in rounds (not by downloads) after the first
    state download."""
    if args.leave_after_download and recorder.download_steps:
        return True
    if args.steps_after_download and recorder.download_steps:
        first = recorder.download_steps[0]
        return sum(step >= first for step in recorder.participants) >= args.steps_after_download
    return args.steps != 0 and collab.local_step >= args.steps


def train(args, collab, model, recorder: Recorder) -> None:
    """Micro-batches until ``--steps`` (forever with 0); the hooks that act from the training loop fire here."""
    generator = torch.Generator().manual_seed(args.data_seed + 1000 * collab.local_step)
    loss_fn = torch.nn.CrossEntropyLoss()
    while not finished(args, collab, recorder):
        x = torch.randn(args.batch_size, 8, generator=generator)
        y = torch.randint(0, 4, (args.batch_size,), generator=generator)
        loss_fn(model(x), y).backward()
        if collab.local_step == args.nan_at_step:
            next(model.parameters()).grad.fill_(float("nan"))
        time.sleep(args.compute_seconds)
        step_before, lr_before = collab.local_step, collab.param_groups[0]["lr"]
        downloads_before = collab.collaboration_state.state_downloads
        call_started = time.monotonic()
        collab.step(batch_size=args.batch_size)
        recorder.longest_call = max(recorder.longest_call, time.monotonic() - call_started)
        recorder.after_call(step_before, lr_before, downloads_before)
        if args.step_file and collab.local_step != step_before:
            save_atomically({"step": collab.local_step, "time": time.monotonic()}, args.step_file)
        if collab.local_step != step_before and collab.local_step == args.kill_after_step:
            print(f"kill hook: SIGKILL right after step {collab.local_step}", flush=True)
            os.killpg(os.getpgid(0), signal.SIGKILL)


def hold(args, collab) -> None:
    """Stay in the collaboration (DHT and averager alive, progress record published) until a signal arrives."""
    save_atomically({"step": collab.local_step}, args.out + ".held")
    print(f"{args.name}: holding at step {collab.local_step}", flush=True)
    while True:
        time.sleep(0.05)


def main() -> int:
    # This peer stands for a program started in a terminal, where Ctrl-C raises KeyboardInterrupt. A shell starts
    # background jobs (``make test &``) with SIGINT ignored, children inherit that, and Python then installs no
    # handler: SIGINT would do nothing. Installed before the optimizer, whose start-up must keep it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    args = parse_args()
    settings = CollaborativeSettings.resolve()  # COLLAB_* from the test
    dht, _hint = start_dht(settings, print_hint=False, startup_timeout=args.startup_timeout)
    install_hooks(args)
    model = make_model(0)
    opt = make_optimizer("sgd", model.parameters())
    if args.ballast_mb:
        add_ballast(opt, args.ballast_mb, args.ballast_seed)
    scheduler = make_scheduler(opt) if args.scheduler else None
    collab = CollaborativeOptimizer(opt, scheduler=scheduler, dht=dht, **settings.optimizer_kwargs())
    restored_params = None
    if args.resume:
        checkpoint = torch.load(args.resume, weights_only=False)
        model.load_state_dict(checkpoint["model"])
        collab.load_state_dict(checkpoint["optimizer"])
        restored_params = [p.detach().clone() for p in model.parameters()]
    recorder = Recorder(collab)
    left_by = "finished"
    # from here on SIGTERM means "leave cleanly" (before, it ends the process as usual); SIGINT keeps Python's
    # default handler (KeyboardInterrupt)
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        barrier(dht, f"{settings.run_id}_test_start", args.name, args.peers)
        view = collab.tracker.fetch_now(timeout=5)  # see the peers that met at the barrier before the first step
        deadline = time.monotonic() + 30
        while args.see_peers and len(view.peers) < args.peers and time.monotonic() < deadline:
            time.sleep(0.05)  # the others' records (announced at restore) may reach the DHT after the barrier
            view = collab.tracker.fetch_now(timeout=5)
        save_atomically({"step": collab.local_step}, args.out + ".ready")
        while args.join_at_step and collab.tracker.fetch_now(timeout=5).epoch < args.join_at_step:
            time.sleep(0.05)
        train(args, collab, model, recorder)
        if args.hold:
            hold(args, collab)
    except KeyboardInterrupt:
        left_by = "SIGINT"
    except LeaveRequested:
        left_by = "SIGTERM"
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # leaving now: a second signal must not interrupt the clean-up
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if args.checkpoint:
        save_atomically({"model": model.state_dict(), "optimizer": collab.state_dict()}, args.checkpoint)
    result = recorder.result(args.name, dht.peer_id.to_base58(), left_by)
    result["restored_params"] = restored_params
    result["start_step"] = recorder.start_step
    save_atomically(result, args.out)
    if args.finish_peers and left_by == "finished":
        barrier(dht, f"{settings.run_id}_test_finish", args.name, args.finish_peers)
    started = time.monotonic()
    collab.shutdown()
    # leaving may settle the last step (a download on the losing side of a fork): the state the user keeps is this
    result.update(
        final=snapshot(collab), local_step=collab.local_step, collaboration_state=collab.collaboration_state.__dict__
    )
    save_atomically(result, args.out)
    dht.shutdown()
    print(f"{args.name}: left ({left_by}) at step {collab.local_step}; shutdown took {time.monotonic() - started:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
