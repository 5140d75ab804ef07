"""Starting benchmark peers as separate OS processes, and ending every one of them, also on failure.

Each peer gets its own session (``start_new_session=True``), so its DHT, averager and p2p daemon children share its
process group; :meth:`PeerGroup.__exit__` SIGTERMs and then SIGKILLs each group.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "/ip4/127.0.0.1/tcp/0"


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


def stop_group(process: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the process group of ``process``, then SIGKILL whatever is left of it."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # children may outlive their leader: always sweep the group
    except ProcessLookupError:
        pass
    if process.poll() is None:
        process.wait(grace)


def peer_env(*layers: dict[str, str] | None) -> dict[str, str]:
    """This process' environment with ``layers`` on top, unbuffered output and the repository on ``PYTHONPATH``."""
    env = {**os.environ}
    for layer in layers:
        env.update(layer or {})
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def launch_logged(command: Sequence[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start ``command`` in the repository, in its own session (so :func:`stop_group` ends its children too), with
    stdout and stderr going to ``log``."""
    with open(log, "wb") as log_file:
        return subprocess.Popen(
            list(command),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=REPO_ROOT,
            start_new_session=True,
        )


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
            stop_group(peer.process)


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
