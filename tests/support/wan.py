"""Peers in the network test bed: each peer process runs inside its node's namespace (``ip netns exec``), bound to
the namespace's address, and joins a DHT node that this (root-namespace) process runs on the bed's bridge."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import hivemind
import torch

from collab_core import hivemind_patches
from tests.support.netns import BRIDGE_IP, NetBed
from tests.support.processes import Peer, PeerSet, launch_logged, peer_env
from tests.support.reliability import RELIABILITY_PEER


@contextmanager
def bridge_dht() -> Iterator[hivemind.DHT]:
    """The collaboration's first DHT node, in the test process, listening on the bed's bridge address only."""
    hivemind_patches.apply()
    dht = hivemind.DHT(host_maddrs=[f"/ip4/{BRIDGE_IP}/tcp/0"], start=True)
    try:
        yield dht
    finally:
        dht.shutdown()


def wan_env(dht: hivemind.DHT, run_id: str, **settings) -> dict[str, str]:
    """COLLAB_* variables shared by the bed's peers (each peer's own address is set by :meth:`WanPeers.start`)."""
    env = {
        "COLLAB_RUN_ID": run_id,
        "COLLAB_INITIAL_PEERS": " ".join(str(addr) for addr in dht.get_visible_maddrs()),
        "HIVEMIND_LOGLEVEL": "INFO",
        "COLLAB_VERBOSE": "1",
    }
    for key, value in settings.items():
        env[f"COLLAB_{key.upper()}"] = str(value)
    return env


class WanPeers(PeerSet):
    """A :class:`~tests.support.processes.PeerSet` whose peers run in the bed's namespaces."""

    def __init__(self, workdir: Path, env: dict[str, str], bed: NetBed):
        super().__init__(workdir, env)
        self.bed = bed

    def start_in(
        self, node: str, args: Sequence[str], env: dict[str, str] | None = None, script: Path = RELIABILITY_PEER
    ) -> Peer:
        """Start a peer named like its node inside that node's namespace, listening on the node's address."""
        log, out = self.workdir / f"{node}.log", self.workdir / f"{node}.pt"
        command = self.bed.command(node, [sys.executable, str(script), "--name", node, "--out", str(out), *args])
        own = {"COLLAB_HOST_MADDRS": self.bed.nodes[node].maddr()}
        process = launch_logged(command, log, peer_env(self.env, own, env))
        peer = Peer(node, process, log, out)
        self.peers.append(peer)
        return peer


def step_of(path: Path) -> int:
    """The step a peer wrote to its ``--step-file`` (-1 before the first)."""
    return torch.load(path, weights_only=False)["step"] if path.exists() else -1


def wait_until(condition: Callable[[], bool], timeout: float, what: str, peers: PeerSet) -> None:
    """Wait (bounded) for ``condition``; fail at once with the logs if a peer exited."""
    deadline = time.monotonic() + timeout
    while not condition():
        exited = [peer.name for peer in peers.peers if peer.process.poll() is not None]
        if exited or time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout}s (exited: {exited})\n{peers.logs()}")
        time.sleep(0.1)
