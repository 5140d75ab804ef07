"""A plain PyTorch training loop that trains one model together with other peers (collab_core quickstart).

Run one peer:

    python examples/core_quickstart.py --steps 20

It prints the exact command a second peer runs to join (with this peer's real addresses). Settings come from
``COLLAB_*`` environment variables (e.g. ``COLLAB_TARGET_BATCH_SIZE``, ``COLLAB_INITIAL_PEERS``) or ``--config``
YAML; see ``collab_core.CollaborativeSettings``.

Or let this script start several peers on this machine, the second one joining with the first one's printed hint:

    python examples/core_quickstart.py --demo --peers 2 --steps 20 --output-dir demo_out

The task is synthetic (labels from a fixed random "teacher" network) so that nothing is downloaded; every peer draws
its own samples.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing

from collab_core import CollaborativeOptimizer, CollaborativeSettings, start_dht  # noqa: E402

FEATURES, CLASSES = 16, 4
FINISH_TIMEOUT = 30.0


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)  # every peer starts from the same weights
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, 64), torch.nn.ReLU(), torch.nn.Linear(64, CLASSES))


def make_batch(generator: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    teacher = torch.Generator().manual_seed(1234)
    weights = torch.randn(FEATURES, CLASSES, generator=teacher)
    x = torch.randn(size, FEATURES, generator=generator)
    return x, (x @ weights).argmax(dim=1)


def evaluate(model: torch.nn.Module) -> tuple[float, float]:
    x, y = make_batch(torch.Generator().manual_seed(999), 2048)
    with torch.no_grad():
        logits = model(x)
    return torch.nn.functional.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def wait_for_peers_to_finish(dht, run_id: str, name: str, participants: tuple[str, ...]) -> None:
    """Stay online until the peers of the last step are done too: leaving mid-round would fail their last step."""
    key = f"{run_id}_finished"
    dht.store(key, subkey=name, value=True, expiration_time=time.time() + 600)
    deadline = time.monotonic() + FINISH_TIMEOUT
    while time.monotonic() < deadline:
        found = dht.get(key, latest=True)
        if found is not None and isinstance(found.value, dict) and len(found.value) >= len(participants):
            return
        time.sleep(0.1)


def train(args: argparse.Namespace) -> int:
    settings = CollaborativeSettings.resolve(yaml_path=args.config, batch_size=args.batch_size)
    dht, hint = start_dht(settings, print_hint=False)
    command = f"python {shlex.quote(os.path.relpath(__file__))} --steps {args.steps}"
    # the hint's assignment line, followed by this script: the exact command a second peer runs
    print(re.sub(r"^(\s+COLLAB_.*)$", rf"\1 {command}", hint, flags=re.MULTILINE) + "\n", flush=True)

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1.0 + 0.05 * step))
    collab = CollaborativeOptimizer(opt, dht=dht, scheduler=scheduler, **settings.optimizer_kwargs())
    generator = torch.Generator().manual_seed(args.seed if args.seed is not None else os.getpid())
    loss_fn = torch.nn.CrossEntropyLoss()
    batch_size = settings.batch_size or 32
    started = time.monotonic()
    try:
        deadline = time.monotonic() + FINISH_TIMEOUT
        while args.wait_for_peers > 1 and time.monotonic() < deadline:  # --demo: start together
            if collab.tracker.fetch_now(timeout=5).num_peers >= args.wait_for_peers:
                break
            time.sleep(0.1)
        if collab.tracker.view.epoch > collab.local_step:
            collab.load_state_from_peers()  # joining a run in progress: start from its current state
        while collab.local_step < args.steps:
            x, y = make_batch(generator, batch_size)
            loss = loss_fn(model(x), y)
            loss.backward()
            time.sleep(args.compute_seconds)  # stands in for a heavier model on slower hardware
            before = collab.local_step
            collab.step(batch_size=batch_size)
            if collab.local_step != before:
                state = collab.collaboration_state
                print(
                    f"step {collab.local_step:3d}  loss {loss.item():.3f}  peers {state.last_round_peers}  "
                    f"samples {state.last_round_samples}  lr {collab.param_groups[0]['lr']:.4f}",
                    flush=True,
                )
        state = collab.collaboration_state
        wait_for_peers_to_finish(dht, settings.run_id, str(dht.peer_id), state.last_round_participants)
    finally:
        collab.shutdown()
        dht.shutdown()

    eval_loss, accuracy = evaluate(model)
    summary = {
        "collaborative_steps": collab.local_step,
        "seconds": round(time.monotonic() - started, 2),
        "eval_loss": eval_loss,
        "eval_accuracy": accuracy,
        "failed_rounds": state.failed_rounds,
        "state_downloads": state.state_downloads,
    }
    print(f"done: {json.dumps(summary)}", flush=True)
    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), out / "model.pt")
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0


def demo(args: argparse.Namespace) -> int:
    """Start ``--peers`` peers on this machine; the first prints the join hint, the others join with it."""
    out = Path(args.output_dir or "demo_out")
    out.mkdir(parents=True, exist_ok=True)
    base_env = {**os.environ, "COLLAB_HOST_MADDRS": "/ip4/127.0.0.1/tcp/0", "PYTHONUNBUFFERED": "1"}
    base_env.setdefault("COLLAB_RUN_ID", f"quickstart-{os.getpid()}")
    base_env.setdefault("COLLAB_TARGET_BATCH_SIZE", "256")
    script = [sys.executable, str(Path(__file__).resolve()), "--steps", str(args.steps)]
    processes: list[subprocess.Popen] = []

    def launch(index: int, env: dict[str, str]) -> subprocess.Popen:
        peer_dir = out / f"peer{index}"
        command = [*script, "--seed", str(index), "--output-dir", str(peer_dir)]
        command += ["--compute-seconds", str(args.compute_seconds), "--wait-for-peers", str(args.peers)]
        log = open(out / f"peer{index}.log", "w")  # noqa: SIM115 - closed when the process ends
        process = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True
        )
        processes.append(process)
        return process

    try:
        first = launch(0, base_env)
        initial_peers = None
        for line in first.stdout:  # the first peer prints its join hint before it trains
            print(f"[peer0] {line}", end="", flush=True)
            match = re.search(r'COLLAB_INITIAL_PEERS="([^"]+)"', line)
            if match:
                initial_peers = match.group(1)
                break
        if initial_peers is None:
            raise RuntimeError(f"peer 0 printed no join hint; see {out / 'peer0.log'}")
        for index in range(1, args.peers):
            launch(index, {**base_env, "COLLAB_INITIAL_PEERS": initial_peers})
        for index, process in enumerate(processes):
            for line in process.stdout:
                print(f"[peer{index}] {line}", end="", flush=True)
            if process.wait() != 0:
                raise RuntimeError(f"peer {index} failed; see {out / f'peer{index}.log'}")
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)

    weights = [torch.load(out / f"peer{i}" / "model.pt") for i in range(args.peers)]
    max_diff = (
        max((weights[0][name] - other[name]).abs().max().item() for other in weights[1:] for name in weights[0])
        if args.peers > 1
        else 0.0
    )
    print("\nsummary")
    for i in range(args.peers):
        summary = json.loads((out / f"peer{i}" / "summary.json").read_text())
        print(f"  peer{i}: {summary}")
    print(f"  max weight difference between peers: {max_diff:.3e} ({'identical' if max_diff <= 1e-6 else 'DIFFERENT'})")
    print(f"  outputs: {out}/peer*/model.pt, logs: {out}/peer*.log")
    return 0 if max_diff <= 1e-6 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="collaborative steps to train")
    parser.add_argument("--batch-size", type=int, default=None, help="samples per micro-batch (default 32)")
    parser.add_argument("--config", default=None, help="YAML file with collaborative settings")
    parser.add_argument("--output-dir", default=None, help="save the final weights and a summary here")
    parser.add_argument("--seed", type=int, default=None, help="data seed of this peer (default: random)")
    parser.add_argument("--compute-seconds", type=float, default=0.0, help="extra time per micro-batch")
    parser.add_argument("--wait-for-peers", type=int, default=1, help="wait until this many peers are online")
    parser.add_argument("--demo", action="store_true", help="start --peers peers on this machine")
    parser.add_argument("--peers", type=int, default=2, help="peers to start with --demo")
    args = parser.parse_args()
    if args.demo:
        if args.compute_seconds == 0.0:
            args.compute_seconds = 0.02
        return demo(args)
    return train(args)


if __name__ == "__main__":
    sys.exit(main())
