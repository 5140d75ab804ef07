"""Start Accelerate peers as real ``accelerate launch`` (or plain python) process groups; always end them.

A peer with several local processes is ``ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N``:
on a CPU-only host that gives N real gloo ranks (``--cpu`` would start one process). Each launch gets its own free
rendezvous port, so several multi-process peers can run at once.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from tests.support.processes import REPO_ROOT, launch_logged, peer_env, stop_process_group

ACCELERATE_PEER = REPO_ROOT / "tests" / "peers" / "accelerate_peer.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(
    script: Path | str, num_processes: int = 1, launcher: str = "accelerate", launch_args: Sequence[str] = ()
) -> list[str]:
    """The command that starts ``script`` with ``num_processes`` local processes.

    ``launcher="accelerate"`` is ``accelerate launch`` (through this interpreter, so the venv's accelerate is used)
    with ``launch_args`` (e.g. ``["--mixed_precision", "bf16"]``); ``launcher="python"`` runs the script directly.
    """
    if launcher == "python":
        assert num_processes == 1
        return [sys.executable, str(script)]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--dynamo_backend", "no"]
    if num_processes > 1:
        command += ["--multi_gpu", "--num_processes", str(num_processes), "--main_process_port", str(free_port())]
    else:
        command += ["--num_processes", "1"]
    return [*command, *launch_args, str(script)]


@dataclass
class LaunchedPeer:
    """One launched peer; each of its processes writes ``out.rank<i>``."""

    name: str
    process: subprocess.Popen
    log: Path
    out: Path
    num_processes: int

    def results(self) -> list[dict]:
        """Every local process's result, by process index."""
        return [torch.load(f"{self.out}.rank{rank}", weights_only=False) for rank in range(self.num_processes)]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def console_text(self) -> str:
        """The output as a terminal received it: tqdm's carriage returns kept (``log_text`` makes them newlines)."""
        return self.log.read_bytes().decode(errors="replace") if self.log.exists() else ""


class LaunchedPeers:
    """Launches peers; use as ``with LaunchedPeers(tmp_path, env) as peers: ...``; every process ends on exit."""

    def __init__(self, workdir: Path, env: dict[str, str]):
        self.workdir, self.env, self.peers = workdir, env, []

    def start(
        self,
        name: str,
        args: Sequence[str],
        *,
        num_processes: int = 1,
        env: dict[str, str] | None = None,
        script: Path = ACCELERATE_PEER,
        launcher: str = "accelerate",
        launch_args: Sequence[str] = (),
        pass_name: bool = True,
    ) -> LaunchedPeer:
        log, out = self.workdir / f"{name}.log", self.workdir / f"{name}.pt"
        full_env = peer_env(self.env, env)
        full_env["HF_HOME"] = str(self.workdir / "hf_home")  # no user-level accelerate config file
        full_env.setdefault("OMP_NUM_THREADS", "1")  # 2 cores shared by every process of every peer
        if num_processes > 1:
            full_env["ACCELERATE_USE_CPU"] = "true"
        command = launch_command(script, num_processes, launcher, launch_args)
        if pass_name:
            command += ["--name", name, "--out", str(out)]
        process = launch_logged([*command, *args], log, full_env)
        peer = LaunchedPeer(name, process, log, out, num_processes)
        self.peers.append(peer)
        return peer

    def wait(self, peers: Sequence[LaunchedPeer] | None = None, timeout: float = 180.0) -> None:
        """Wait until the given peers (default: all) exit; fail with their logs if one fails or time runs out."""
        peers = list(peers if peers is not None else self.peers)
        deadline = time.monotonic() + timeout
        for peer in peers:
            try:
                code = peer.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"peer {peer.name} did not finish in {timeout}s\n{self.logs()}") from None
            if code != 0:
                raise AssertionError(f"peer {peer.name} exited with {code}\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"----- {p.name} -----\n{p.log_text()[-8000:]}" for p in self.peers)

    def __enter__(self) -> LaunchedPeers:
        return self

    def __exit__(self, *exc) -> None:
        for peer in self.peers:
            stop_process_group(peer.process)
