"""Starting benchmark peers as separate OS processes, and ending every one of them, also on failure.

Each peer gets its own session (``start_new_session=True``), so its DHT, averager and p2p daemon children share its
process group; :meth:`PeerGroup.__exit__` SIGTERMs and then SIGKILLs each group. Launching and stopping are the test
suite's (:mod:`tests.support.processes`): one implementation for tests and benchmarks.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.processes import LOOPBACK, REPO_ROOT, launch_logged, peer_env, stop_process_group

__all__ = ["LOOPBACK", "REPO_ROOT", "Launched", "PeerFailed", "PeerGroup", "wait_for_file"]


class PeerFailed(RuntimeError):
    """A peer exited with an error or did not finish in time (the message holds the end of its log)."""


@dataclass
class Launched:
    """A started peer: its process, log, output record and when it was launched (wall clock)."""

    name: str
    process: subprocess.Popen
    log: Path
    out: Path
    launched_at: float

    def record(self) -> dict[str, Any]:
        """The peer's JSON record (with ``launched_at`` added)."""
        data = json.loads(self.out.read_text())
        data["launched_at"] = self.launched_at
        return data

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


class PeerGroup:
    """Peers of one measurement: ``with PeerGroup(workdir, env) as group: group.start(...); group.wait()``."""

    def __init__(self, workdir: Path, env: dict[str, str]):
        self.workdir, self.env = workdir, env
        self.peers: list[Launched] = []
        workdir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, args: Sequence[str], env: dict[str, str] | None = None) -> Launched:
        """Start ``python -m bench.peer --name NAME --out ... ARGS`` in its own session."""
        log, out = self.workdir / f"{name}.log", self.workdir / f"{name}.json"
        launched_at = time.time()
        command = [sys.executable, "-m", "bench.peer", "--name", name, "--out", str(out), *args]
        process = launch_logged(command, log, peer_env(self.env, env))
        peer = Launched(name, process, log, out, launched_at)
        self.peers.append(peer)
        return peer

    def wait(self, timeout: float) -> list[dict[str, Any]]:
        """Wait until every peer exits; their records. Raises :class:`PeerFailed` on an error or timeout."""
        deadline = time.monotonic() + timeout
        for peer in self.peers:
            try:
                code = peer.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise PeerFailed(f"peer {peer.name} did not finish within {timeout:.0f}s\n{peer.tail()}") from None
            if code != 0:
                raise PeerFailed(f"peer {peer.name} exited with {code}\n{peer.tail()}")
        return [peer.record() for peer in self.peers]

    def __enter__(self) -> PeerGroup:
        return self

    def __exit__(self, *exc: Any) -> None:
        for peer in self.peers:
            stop_process_group(peer.process)


def wait_for_file(path: Path, timeout: float, peers: Sequence[Launched]) -> None:
    """Wait until ``path`` exists; fail early if a peer exits meanwhile."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        for peer in peers:
            if peer.process.poll() is not None:
                raise PeerFailed(f"peer {peer.name} exited early ({peer.process.returncode})\n{peer.tail()}")
        if time.monotonic() > deadline:
            raise PeerFailed(f"{path.name} did not appear within {timeout:.0f}s")
        time.sleep(0.02)
