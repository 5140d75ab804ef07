"""One training peer for the multi-peer tests: a real process with its own DHT node, averager and data.

It trains a small MLP with ``CollaborativeOptimizer`` until the collaboration reaches ``--steps`` collaborative steps
and writes what the tests check to ``--out`` (a torch file): every micro-batch it contributed (for the single-process
replay), parameters and optimizer state after each collaborative step, the learning rate each update used, and the
optimizer's counters. Peers meet at a start barrier and a finish barrier (records in the DHT), so that no peer
starts before the others exist or leaves while the others may still be averaging with it.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time

import torch
from hivemind.averaging.allreduce import AllreduceException

from collab_core import (
    CollaborativeAdaptiveOptimizer,
    CollaborativeOptimizer,
    CollaborativeSettings,
    DiLoCoOptimizer,
    start_dht,
)
from collab_core.averager import CollaborativeAverager
from collab_core.planner import Action, Decision
from collab_core.sync import ServedState
from tests.support.barrier import barrier as shared_barrier

BARRIER_TIMEOUT = 60.0
FAILED_ROUND_LOG = "round hook: failing the all-reduce of step"


def make_model(seed: int, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(dtype)


def make_optimizer(name: str, params) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=0.01)
    if name == "adamw":  # DiLoCo's inner optimizer
        return torch.optim.AdamW(params, lr=0.01, weight_decay=0.01)
    raise ValueError(name)


def make_scheduler(opt: torch.optim.Optimizer):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))


def barrier(dht, key: str, name: str, expected: int) -> None:
    """Wait (at most ``BARRIER_TIMEOUT`` s) until ``expected`` peers arrived at ``key`` (tests/support/barrier.py)."""
    shared_barrier(dht, key, name, expected, timeout=BARRIER_TIMEOUT)


def round_step(averager: CollaborativeAverager, group_info) -> int:
    """The collaborative step of the round being assembled (from this peer's own gathered data)."""
    _bandwidth, _mode, user_data = averager.serializer.loads(
        group_info.gathered[group_info.peer_ids.index(averager.peer_id)]
    )
    return averager.serializer.loads(user_data)["step"]


def die_during_allreduce(at_step: int) -> None:
    """Test hook: kill this peer (its whole process group) when its all-reduce for step ``at_step`` starts.

    Patched into the averager class before the averager process is forked, so it runs inside that process right
    after the group is assembled and before any tensor is sent: the others expect this peer's data and never get it.
    """
    original = CollaborativeAverager._aggregate_with_group

    async def aggregate_or_die(self, group_info, *args, **kwargs):
        if round_step(self, group_info) == at_step:
            print(f"die hook: SIGKILL at the start of the all-reduce of step {at_step}", flush=True)
            os.killpg(os.getpgid(0), signal.SIGKILL)
        return await original(self, group_info, *args, **kwargs)

    CollaborativeAverager._aggregate_with_group = aggregate_or_die


def fail_round_after_exchange(at_step: int) -> None:
    """Test hook: the first all-reduce of step ``at_step`` or later fails on this peer after every part was exchanged.

    Its groupmates got their results and took the step; this peer did not (as when the last message of a round is
    lost). A peer that missed the round of ``at_step`` itself fails its next one instead; :func:`failed_round_step`
    reads which step it was from the log. Patched before the averager process forks, so it runs there.
    """
    original = CollaborativeAverager._run_allreduce_inplace_
    fired = []

    async def exchange_then_fail(self, tensors, group_info, *args, **kwargs):
        await original(self, tensors, group_info, *args, **kwargs)
        step = round_step(self, group_info)
        if not fired and step >= at_step:
            fired.append(True)
            print(f"{FAILED_ROUND_LOG} {step} after the exchange", flush=True)
            raise AllreduceException(f"test hook: the round of step {step} failed on this peer only")

    CollaborativeAverager._run_allreduce_inplace_ = exchange_then_fail


def fail_round_at_start(at_step: int) -> None:
    """Test hook: the first all-reduce of step ``at_step`` or later fails on this peer as it starts, before this
    peer sends anything: its groupmates get partial results (failure order (b)). Runs in the averager process."""
    original = CollaborativeAverager._run_allreduce_inplace_
    fired = []

    async def fail_then_exchange(self, tensors, group_info, *args, **kwargs):
        step = round_step(self, group_info)
        if not fired and step >= at_step:
            fired.append(True)
            print(f"{FAILED_ROUND_LOG} {step} at its start", flush=True)
            raise AllreduceException(f"test hook: the round of step {step} failed on this peer as it started")
        return await original(self, tensors, group_info, *args, **kwargs)

    CollaborativeAverager._run_allreduce_inplace_ = fail_then_exchange


def freeze_in_round(at_step: int, seconds: float) -> None:
    """Test hook: when this peer's all-reduce of step ``at_step`` starts, its whole process group is stopped
    (SIGSTOP) for ``seconds``, then resumed (failure order (d)). A waker process in its own session sends SIGCONT."""
    original = CollaborativeAverager._aggregate_with_group
    fired = []

    async def aggregate_frozen(self, group_info, *args, **kwargs):
        if not fired and round_step(self, group_info) >= at_step:
            fired.append(True)
            group = os.getpgid(0)
            print(f"freeze hook: SIGSTOP for {seconds}s at the all-reduce of step {at_step}", flush=True)
            subprocess.Popen(
                ["sh", "-c", f"sleep {seconds}; kill -CONT -{group}"], start_new_session=True, close_fds=True
            )
            os.killpg(group, signal.SIGSTOP)
        return await original(self, group_info, *args, **kwargs)

    CollaborativeAverager._aggregate_with_group = aggregate_frozen


def step_alone_at(collab: CollaborativeOptimizer, at_step: int) -> None:
    """Test hook: at ``at_step`` this peer's planner decides to step alone once, whoever else is there.

    This is the wrong decision that forked the demo's replicas (after an asymmetric round both peers took a step on
    their own): the engine must notice the fork and heal it, whatever made it.
    """
    planner = collab.collaboration.planner
    plan_step = planner.plan_step
    fired = []

    def plan_wrongly(records, local, now, may_download):
        decision = plan_step(records, local, now, may_download)
        # (also instead of a download: a peer that lags a moment sees the other one's solo step already taken)
        if (
            not fired
            and local.step == at_step
            and decision.action in (Action.RUN_ROUND, Action.STEP_ALONE, Action.DOWNLOAD)
        ):
            fired.append(True)
            print(f"solo hook: stepping alone at step {at_step} instead of {decision.action.value}", flush=True)
            return Decision(Action.STEP_ALONE)
        return decision

    planner.plan_step = plan_wrongly


def meet_forked_peers(collab: CollaborativeOptimizer, dht, run_id: str, name: str, peers: int) -> None:
    """After the solo hook's step: wait until every peer took its own solo step and this peer's view shows them all
    at this step. So every peer's next ``step()`` sees the fork (same step, different fingerprints) at once; without
    it, whichever peer is faster steps alone again and the others download because it is *ahead*, which heals the
    replicas too but never exercises the fork rule this test is about."""
    print(f"solo hook: meeting the other peers at step {collab.local_step}", flush=True)
    barrier(dht, f"{run_id}_solo_done", name, peers)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        view = collab.tracker.fetch_now(timeout=5)
        if len(view.peers_at(collab.local_step)) >= peers:
            return
        time.sleep(0.05)
    raise TimeoutError(f"the other peers' records never showed step {collab.local_step}")


def delay_publication_after(collab: CollaborativeOptimizer, after_step: int, seconds: float) -> None:
    """Test hook: once this peer reached ``after_step``, it publishes nothing for ``seconds`` (failure order (c)):
    the others' views keep showing its previous record while they run their next round."""
    tracker = collab.tracker
    report, announce = tracker.report_local_progress, tracker.announce
    window = []

    def silent() -> bool:
        if not window and collab.local_step >= after_step:
            window.append(time.monotonic() + seconds)
            print(f"publication hook: silent for {seconds}s from step {collab.local_step}", flush=True)
        return bool(window) and time.monotonic() < window[0]

    def report_late(local_epoch, samples_accumulated, update_global_samples=True, publish=True):
        report(local_epoch, samples_accumulated, update_global_samples, publish=publish and not silent())

    def announce_late(timeout):
        if not silent():
            announce(timeout)

    tracker.report_local_progress = report_late
    tracker.announce = announce_late


def serve_own_state_for(collab: CollaborativeOptimizer, seconds: float) -> None:
    """Test hook: for ``seconds`` from the first download attempt, every download returns this peer's own state, as
    when the only peer it can reach is at its own step (a partition): the records ahead look unbacked."""
    engine = collab.collaboration
    fetch = engine.sync.fetch
    window = []

    def fetch_cut_off(timeout):
        if not window:
            window.append(time.monotonic() + seconds)
        if time.monotonic() < window[0]:
            print("partition hook: only this peer's own state is reachable", flush=True)
            return ServedState(*engine._shared_state())
        return fetch(timeout)

    engine.sync.fetch = fetch_cut_off


def failed_round_step(log: str) -> int:
    """The step whose all-reduce :func:`fail_round_after_exchange` failed, read from the peer's log."""
    match = re.search(FAILED_ROUND_LOG + r" (\d+)", log)
    assert match is not None, "the round hook never fired"
    return int(match.group(1))


def visible_maddrs(dht) -> list[str]:
    try:
        return [str(addr) for addr in dht.get_visible_maddrs()]
    except ValueError:  # hivemind raises "No multiaddrs found" for a peer that listens nowhere
        return []


#: an optimizer-state entry that only makes the state large (``reliability_peer --ballast-mb``): the optimizer never
#: reads it, downloads carry it, gradient rounds do not
BALLAST_KEY = "ballast"


def ballast_digest(value: torch.Tensor) -> torch.Tensor:
    """A few numbers that tell two ballast tensors apart (snapshots keep these, not the megabytes)."""
    flat = value.detach().flatten().double()
    return torch.stack([flat.sum(), flat[0], flat[len(flat) // 2], flat[-1]])


def snapshot(opt: CollaborativeOptimizer) -> dict:
    params = [p.detach().clone() for p in opt.param_groups[0]["params"]]
    state = {}
    for index, param in enumerate(opt.param_groups[0]["params"]):
        for key, value in opt.state.get(param, {}).items():
            if isinstance(value, torch.Tensor):
                state[f"{index}.{key}"] = ballast_digest(value) if key == BALLAST_KEY else value.detach().clone()
    result = {"params": params, "state": state, "lr": opt.param_groups[0]["lr"]}
    if isinstance(opt, DiLoCoOptimizer):  # the shared state: θ_global and the outer momentum (inner state is local)
        outer = opt.outer_optimizer
        result["global_params"] = [p.detach().clone() for p in opt.global_parameters]
        result["outer_state"] = {
            f"{index}.momentum_buffer": outer.state[p]["momentum_buffer"].clone()
            for index, p in enumerate(opt.global_parameters)
            if "momentum_buffer" in outer.state.get(p, {})
        }
        result["inner_steps"] = [
            int(opt.state[p]["step"]) if "step" in opt.state.get(p, {}) else 0 for p in opt.param_groups[0]["params"]
        ]
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--peers", type=int, required=True, help="peers at the start barrier")
    parser.add_argument("--finish-peers", type=int, default=None, help="peers at the finish barrier")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--data-seed", type=int, required=True)
    parser.add_argument("--model-seed", type=int, default=0)
    parser.add_argument("--optimizer", default="sgd")
    parser.add_argument("--scheduler", action="store_true")
    parser.add_argument("--adaptive", default="", help="comma-separated optimizer statistics to average")
    parser.add_argument("--join-at-step", type=int, default=0, help="start only once the collaboration is here")
    parser.add_argument("--die-at-step", type=int, default=-1)
    parser.add_argument("--fail-round-at-step", type=int, default=-1, help="only this peer's round of it fails")
    parser.add_argument("--fail-round-start-at-step", type=int, default=-1, help="its round fails as it starts")
    parser.add_argument("--freeze-at-step", type=int, default=-1, help="SIGSTOP in the round of this step")
    parser.add_argument("--freeze-seconds", type=float, default=0.0)
    parser.add_argument("--solo-at-step", type=int, default=-1, help="wrongly step alone at this step once")
    parser.add_argument("--silent-after-step", type=int, default=-1, help="publish nothing for a while from here")
    parser.add_argument("--silent-seconds", type=float, default=0.0)
    parser.add_argument("--cut-off-seconds", type=float, default=0.0, help="downloads serve its own state at first")
    parser.add_argument("--max-calls", type=int, default=100000)
    parser.add_argument("--grad-scale", type=float, default=0.0, help="fp16-style loss scaling with this scale")
    parser.add_argument("--overflow-at-step", type=int, default=-1, help="make this peer's gradient inf there")
    parser.add_argument("--compute-seconds", type=float, default=0.03, help="simulated compute per micro-batch")
    parser.add_argument("--algorithm", default="", help="'diloco': DiLoCoOptimizer with --optimizer as inner one")
    parser.add_argument("--inner-optimizer", default="", help="the inner optimizer (DiLoCo), e.g. adamw")
    parser.add_argument("--dtype", default="float32", help="parameter dtype (bfloat16: bf16 training)")
    parser.add_argument("--resume", default="", help="load this checkpoint or swarm backup before training")
    args = parser.parse_args()

    settings = CollaborativeSettings.resolve()  # COLLAB_* from the test
    dht, _hint = start_dht(settings, print_hint=False)
    dtype = getattr(torch, args.dtype)
    model = make_model(args.model_seed, dtype)
    opt = make_optimizer(args.inner_optimizer or args.optimizer, model.parameters())
    scheduler = make_scheduler(opt) if args.scheduler else None
    kwargs = settings.optimizer_kwargs()
    scaler = None
    if args.grad_scale:  # fp32 math with a power-of-two scale: exact, so the replay comparison still holds
        scaler = torch.amp.GradScaler("cpu", init_scale=args.grad_scale, growth_interval=3)
        kwargs["grad_scaler"] = scaler
    if args.die_at_step >= 0:
        die_during_allreduce(args.die_at_step)
    if args.fail_round_at_step >= 0:
        fail_round_after_exchange(args.fail_round_at_step)
    if args.fail_round_start_at_step >= 0:
        fail_round_at_start(args.fail_round_start_at_step)
    if args.freeze_at_step >= 0:
        freeze_in_round(args.freeze_at_step, args.freeze_seconds)
    if args.algorithm == "diloco":
        collab = DiLoCoOptimizer(opt, scheduler=scheduler, dht=dht, **settings.outer_kwargs(), **kwargs)
    elif args.adaptive:
        collab = CollaborativeAdaptiveOptimizer(
            opt, average_opt_statistics=args.adaptive.split(","), scheduler=scheduler, dht=dht, **kwargs
        )
    else:
        collab = CollaborativeOptimizer(opt, scheduler=scheduler, dht=dht, **kwargs)

    if args.solo_at_step >= 0:
        step_alone_at(collab, args.solo_at_step)
    if args.silent_after_step >= 0:
        delay_publication_after(collab, args.silent_after_step, args.silent_seconds)
    if args.cut_off_seconds:
        serve_own_state_for(collab, args.cut_off_seconds)

    resumed_at = None
    if args.resume:
        collab.load_state_dict(torch.load(args.resume, weights_only=False))
        resumed_at = {"step": collab.local_step, "params": [p.detach().clone() for p in model.parameters()]}
    barrier(dht, f"{settings.run_id}_test_start", args.name, args.peers)
    collab.tracker.fetch_now(timeout=5)  # see the peers that met at the barrier before the first step
    if args.join_at_step:
        while collab.tracker.fetch_now(timeout=5).epoch < args.join_at_step:
            time.sleep(0.05)

    generator = torch.Generator().manual_seed(args.data_seed)
    loss_fn = torch.nn.CrossEntropyLoss()
    micro_batches, per_step, lrs_used, changes_at_call, step_times, participants = [], {}, {}, [], {}, {}
    inner_batches = []  # DiLoCo: the micro-batches the inner optimizer stepped on, labelled with the outer step
    contributions = {}
    started_at = time.monotonic()
    calls = 0
    while collab.local_step < args.steps and calls < args.max_calls:
        x = torch.randn(args.batch_size, 8, generator=generator)
        y = torch.randint(0, 4, (args.batch_size,), generator=generator)
        loss = loss_fn(model(x.to(dtype)).float(), y)
        collab.record_loss(loss)  # shown by collab monitor
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if collab.local_step == args.overflow_at_step:
            next(model.parameters()).grad[0, 0] = float("inf")
        time.sleep(args.compute_seconds)
        step_before, lr_before = collab.local_step, collab.param_groups[0]["lr"]
        params_before = [p.detach().clone() for p in model.parameters()]
        downloads_before = collab.collaboration_state.state_downloads
        collab.step(batch_size=args.batch_size)
        calls += 1
        downloaded = collab.collaboration_state.state_downloads != downloads_before
        if not downloaded:  # a micro-batch that triggers a download is discarded
            micro_batches.append((step_before, x, y))
        if collab.last_step_report is not None and collab.last_step_report.local_update:
            inner_batches.append((step_before, x, y))
        if any(not torch.equal(a, b) for a, b in zip(params_before, model.parameters(), strict=True)):
            changes_at_call.append(calls)
        if args.solo_at_step >= 0 and step_before == args.solo_at_step and collab.local_step == step_before + 1:
            meet_forked_peers(collab, dht, settings.run_id, args.name, args.peers)
        if collab.local_step != step_before:
            per_step[collab.local_step] = snapshot(collab)
            step_times[collab.local_step] = time.monotonic()
            if not downloaded:
                state = collab.collaboration_state
                participants[step_before] = set(state.last_round_participants)
                contributions[step_before] = dict(state.last_round_contributions)
                lrs_used[step_before] = lr_before

    state = collab.collaboration_state
    result = {
        "name": args.name,
        "local_step": collab.local_step,
        "micro_batches": micro_batches,
        "inner_batches": inner_batches,
        "per_step": per_step,
        "lrs_used": lrs_used,
        "changes_at_call": changes_at_call,
        "calls": calls,
        "final": snapshot(collab),
        "final_lr": collab.param_groups[0]["lr"],
        "collaboration_state": state.__dict__,
        "seconds": time.monotonic() - started_at,
        "step_times": step_times,
        "participants": participants,
        "contributions": contributions,
        "peer_id": dht.peer_id.to_base58(),
        "visible_maddrs": visible_maddrs(dht),
        "state_dict": collab.state_dict(),
        "scale": scaler.get_scale() if scaler is not None else None,
        "resumed_at": resumed_at,
    }
    torch.save(result, args.out + ".tmp")
    os.replace(args.out + ".tmp", args.out)
    barrier(dht, f"{settings.run_id}_test_finish", args.name, args.finish_peers or args.peers)
    collab.shutdown()
    # leaving may settle the last step (a download on the losing side of a fork): the state the user keeps is this
    result.update(
        local_step=collab.local_step,
        final=snapshot(collab),
        collaboration_state=collab.collaboration_state.__dict__,
        state_dict=collab.state_dict(),
    )
    torch.save(result, args.out + ".tmp")
    os.replace(args.out + ".tmp", args.out)
    dht.shutdown()
    print(f"{args.name}: done at step {collab.local_step} after {calls} calls", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
