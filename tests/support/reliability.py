"""Helpers shared by the reliability tests: peer arguments, replica comparisons, process-group checks."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from tests.support.processes import REPO_ROOT, Peer, PeerSet

RELIABILITY_PEER = REPO_ROOT / "tests" / "peers" / "reliability_peer.py"


def peer_args(batch_size: int, data_seed: int, *extra: str, steps: int = 0, peers: int = 1) -> list[str]:
    """Command-line arguments of ``tests/peers/reliability_peer.py``."""
    return [
        "--batch-size",
        str(batch_size),
        "--data-seed",
        str(data_seed),
        "--steps",
        str(steps),
        "--peers",
        str(peers),
        *extra,
    ]


def start(peers: PeerSet, name: str, args: list[str], env: dict[str, str] | None = None) -> Peer:
    """Start one reliability peer."""
    return peers.start(name, args, env, script=RELIABILITY_PEER)


def tensor_diff(a: Iterable[torch.Tensor], b: Iterable[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def snapshot_diff(a: dict, b: dict) -> float:
    """Largest difference between two ``snapshot()`` records: parameters and every optimizer state tensor."""
    assert a["state"].keys() == b["state"].keys()
    state = [(a["state"][k] - b["state"][k]).abs().max().item() for k in a["state"]]
    return max([tensor_diff(a["params"], b["params"]), *state])


def max_replica_diff(results: Iterable[dict]) -> tuple[float, int]:
    """Max difference among peers after each step they share, and how many (pair, step) comparisons were made."""
    worst, compared = 0.0, 0
    for a, b in itertools.combinations(list(results), 2):
        for step in set(a["per_step"]) & set(b["per_step"]):
            worst = max(worst, snapshot_diff(a["per_step"][step], b["per_step"][step]))
            compared += 1
    return worst, compared


def all_finite(result: dict) -> bool:
    snapshots = [*result["per_step"].values(), result["final"]]
    tensors = [t for s in snapshots for t in [*s["params"], *s["state"].values()]]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def group_is_gone(pgid: int) -> bool:
    """Whether no process of the process group ``pgid`` is left (a peer's DHT, averager and p2p daemons)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def group_ends(pgid: int, timeout: float = 10.0) -> bool:
    """Whether every process of the group ``pgid`` is gone within ``timeout`` seconds (daemons exit shortly after
    their parent: a leftover is one that is still there after that)."""
    deadline = time.monotonic() + timeout
    while not group_is_gone(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def wait_for_file(path: Path, peers: PeerSet, watched: Iterable[Peer], timeout: float) -> None:
    """Wait (bounded) until ``path`` exists; fail at once with the logs if a watched peer exited."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        for peer in watched:
            if peer.process.poll() is not None:
                raise AssertionError(f"peer {peer.name} exited with {peer.process.returncode}\n{peers.logs()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path.name} did not appear within {timeout}s\n{peers.logs()}")
        time.sleep(0.05)


def exit_code(peer: Peer, timeout: float) -> int:
    """The peer's exit status, waiting at most ``timeout`` seconds."""
    return peer.process.wait(timeout)


def longest_gap(result: dict) -> float:
    """The longest time (seconds) between two consecutive collaborative steps of a peer."""
    times = [result["step_times"][step] for step in sorted(result["step_times"])]
    return max((later - earlier for earlier, later in zip(times, times[1:], strict=False)), default=0.0)
