"""Start peers as separate OS processes and make sure every one of them ends, also when a test fails.

Each peer gets its own session (``start_new_session=True``), so its DHT, averager and p2p daemon children share its
process group, which :func:`stop_process_group` ends. The launching functions (:func:`peer_env`,
:func:`launch_logged`, :func:`stop_process_group`) are also what the benchmarks (``bench/processes.py``) use.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import hivemind
import torch

from collab_core import hivemind_patches

REPO_ROOT = Path(__file__).resolve().parents[2]
CORE_PEER = REPO_ROOT / "tests" / "peers" / "core_peer.py"
LOOPBACK = "/ip4/127.0.0.1/tcp/0"


def stop_process_group(process: subprocess.Popen, grace: float = 5.0) -> None:
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
    """Start ``command`` in the repository, in its own session (so :func:`stop_process_group` ends its children
    too), with stdout and stderr going to ``log``."""
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


@dataclass
class Peer:
    """A running peer process; its output goes to ``log``."""

    name: str
    process: subprocess.Popen
    log: Path
    out: Path
    extra: dict = field(default_factory=dict)

    def result(self) -> dict:
        return torch.load(self.out, weights_only=False)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def run_to_completion(command: Sequence[str], timeout: float, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run ``command`` in the repository in its own session; its exit status and output (stdout + stderr). Its whole
    process group is ended afterwards, also on timeout or failure."""
    process = subprocess.Popen(
        list(command),
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        stop_process_group(process)
    return process.returncode, output


class PeerSet:
    """Launches peers; use as ``with PeerSet(tmp_path, env) as peers: ...``; everything is stopped on exit."""

    def __init__(self, workdir: Path, env: dict[str, str]):
        self.workdir, self.env, self.peers = workdir, env, []

    def start(self, name: str, args: Sequence[str], env: dict[str, str] | None = None, script: Path = CORE_PEER):
        log, out = self.workdir / f"{name}.log", self.workdir / f"{name}.pt"
        command = [sys.executable, str(script), "--name", name, "--out", str(out), *args]
        process = launch_logged(command, log, peer_env(self.env, env))
        peer = Peer(name, process, log, out)
        self.peers.append(peer)
        return peer

    def wait(self, peers: Sequence[Peer] | None = None, timeout: float = 180.0) -> None:
        """Wait until the given peers (default: all) exit; fail with their logs if one fails or time runs out."""
        peers = list(peers if peers is not None else self.peers)
        deadline = time.monotonic() + timeout
        for peer in peers:
            remaining = max(0.1, deadline - time.monotonic())
            try:
                code = peer.process.wait(remaining)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"peer {peer.name} did not finish in {timeout}s\n{self.logs()}") from None
            if code != 0:
                raise AssertionError(f"peer {peer.name} exited with {code}\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"----- {p.name} -----\n{p.log_text()[-6000:]}" for p in self.peers)

    def __enter__(self) -> PeerSet:
        return self

    def __exit__(self, *exc) -> None:
        for peer in self.peers:
            stop_process_group(peer.process)


@contextmanager
def bootstrap_dht() -> Iterator[hivemind.DHT]:
    """A DHT node in the test process that peers use as their initial peer (with collab_core's hivemind
    workarounds, like a node started by ``start_dht``)."""
    hivemind_patches.apply()
    dht = hivemind.DHT(host_maddrs=[LOOPBACK], start=True)
    try:
        yield dht
    finally:
        dht.shutdown()


def collab_env(dht: hivemind.DHT, run_id: str, **settings) -> dict[str, str]:
    """COLLAB_* variables for a peer joining ``dht`` on loopback."""
    env = {
        "COLLAB_RUN_ID": run_id,
        "COLLAB_INITIAL_PEERS": " ".join(str(addr) for addr in dht.get_visible_maddrs()),
        "COLLAB_HOST_MADDRS": LOOPBACK,
        "HIVEMIND_LOGLEVEL": "INFO",
        "COLLAB_VERBOSE": "1",  # peer logs (printed when a test fails) show every step and round
    }
    for key, value in settings.items():
        env[f"COLLAB_{key.upper()}"] = str(value)
    return env
