"""A network test bed on one machine: each peer in its own network namespace, rate-limited links, NAT, cut links.

One job: create and tear down namespaces, a bridge, veth pairs with a ``tbf`` rate limit, "home router" namespaces
that NAT (iptables MASQUERADE) the peers behind them, and cut/restore a peer's link. Used by ``tests/wan`` and by
the W6 benchmark (``bench/wan.py``).

Topology (``10.213.0.0/16``, a subnet that exists only inside this test bed)::

    root namespace: bridge ctw<id>br 10.213.0.1/24  (the test process' own DHT node binds here)
       |-- veth -- [ns ctw-<id>-a] 10.213.0.10/24     a "public" peer
       |-- veth -- [ns ctw-<id>-b] 10.213.0.11/24
       '-- veth -- [ns ctw-<id>-r1] 10.213.0.20/24 -- MASQUERADE -- 10.213.1.1/24
                                                        '-- veth -- [ns ctw-<id>-n] 10.213.1.2/24 (behind NAT)

Every link's rate limit is a ``tbf`` qdisc on both ends of its veth pair (upload and download). The public
namespaces have no default route and no route to a NAT'd LAN, so nothing can dial a NAT'd peer, and nothing in
the bed can reach anything outside it. The root namespace gets an ``unreachable 10.213.0.0/16`` route, so that a
dial from the test process to an address of a NAT'd LAN fails at once instead of leaving through the machine's
default route. ``netem`` is not available on the machines this runs on: latency and loss are not emulated.

Safety: only one bed exists at a time (an exclusive ``flock`` on :data:`LOCK_PATH`, released by the kernel even if
the process dies); holding it, :meth:`NetBed.__enter__` first removes every leftover of a crashed run (names start
with :data:`PREFIX`), and :meth:`NetBed.close` (called on exit, also on errors and KeyboardInterrupt) kills the
processes left in the bed's namespaces and removes every namespace, link, qdisc, rule and route it created.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "ctw"
"""Every namespace (``ctw-...``) and link (``ctw...``) of a bed starts with this; leftovers are found by it."""
SUBNET = "10.213.0.0/16"
BRIDGE_IP = "10.213.0.1"
LOCK_PATH = Path("/run/collab-training-netbed.lock")

__all__ = ["BRIDGE_IP", "PREFIX", "SUBNET", "NetBed", "NetBedUnavailable", "NetNode", "leftovers", "unavailable_reason"]


class NetBedUnavailable(RuntimeError):
    """Network namespaces cannot be created here (not root, no ``ip``/``tc``/``iptables``, or the kernel refuses)."""


def _run(*command: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(list(command), capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed ({result.returncode}): {result.stderr.strip()}")
    return result


def unavailable_reason() -> str | None:
    """Why a bed cannot be built on this machine (None: it can). Checks root, the tools, and creates (and removes)
    one namespace."""
    if os.geteuid() != 0:
        return "the network test bed needs root (network namespaces, veth pairs, tc and iptables)"
    missing = [tool for tool in ("ip", "tc", "iptables") if shutil.which(tool) is None]
    if missing:
        return f"the network test bed needs {', '.join(missing)} (Debian packages iproute2 and iptables)"
    probe = f"{PREFIX}-probe-{os.getpid()}"
    made = _run("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"network namespaces cannot be created here: {made.stderr.strip()}"
    _run("ip", "netns", "del", probe, check=False)
    return None


def leftovers() -> dict[str, list[str]]:
    """Namespaces and root-namespace links of this test bed that exist now (names starting with :data:`PREFIX`)."""
    namespaces = [line.split()[0] for line in _run("ip", "netns", "list").stdout.splitlines() if line.strip()]
    links = [line.split()[0].split("@")[0] for line in _run("ip", "-br", "link").stdout.splitlines() if line.strip()]
    routes = [line for line in _run("ip", "route").stdout.splitlines() if line.startswith(f"unreachable {SUBNET}")]
    return {
        "namespaces": [name for name in namespaces if name.startswith(PREFIX + "-")],
        "links": [name for name in links if name.startswith(PREFIX)],
        "routes": routes,
    }


def _kill_namespace_processes(namespace: str) -> None:
    pids = [int(pid) for pid in _run("ip", "netns", "pids", namespace, check=False).stdout.split()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while pids and time.monotonic() < deadline:
            pids = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
            time.sleep(0.05)


def _remove_leftovers() -> None:
    found = leftovers()
    for namespace in found["namespaces"]:
        _kill_namespace_processes(namespace)
        _run("ip", "netns", "del", namespace, check=False)
    for link in found["links"]:
        _run("ip", "link", "del", link, check=False)
    for _route in found["routes"]:
        _run("ip", "route", "del", "unreachable", SUBNET, check=False)


@dataclass
class NetNode:
    """One namespace of the bed: a peer's machine (``kind="peer"``) or a home router (``kind="router"``)."""

    name: str
    namespace: str
    ip: str
    rate_mbit: float | None
    uplink: str  # the interface inside the namespace that leads towards the bridge (or towards its router)
    host_end: str  # the other end of that veth pair (in the root namespace, or in the router's namespace)
    host_namespace: str | None  # None: the root namespace
    behind: str | None = None  # the router this node is behind
    kind: str = "peer"
    extra: dict = field(default_factory=dict)

    def maddr(self, port: int = 0) -> str:
        """The multiaddr a hivemind peer in this namespace listens on (``/ip4/<ip>/tcp/<port>``)."""
        return f"/ip4/{self.ip}/tcp/{port}"


class NetBed:
    """The test bed; use as ``with NetBed() as bed: bed.add_peer("a", rate_mbit=20) ...``; removed on exit.

    Args:
        lock_timeout: Seconds to wait for another bed on this machine to be removed before giving up.
    """

    def __init__(self, lock_timeout: float = 600.0):
        self.id = uuid.uuid4().hex[:4]
        self.bridge = f"{PREFIX}{self.id}br"
        self.nodes: dict[str, NetNode] = {}
        self.lock_timeout = lock_timeout
        self._lock_file = None
        self._next_public = 10
        self._next_lan = 1
        self._built = False

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def __enter__(self) -> NetBed:
        reason = unavailable_reason()
        if reason:
            raise NetBedUnavailable(reason)
        self._lock()
        try:
            _remove_leftovers()  # a crashed run's namespaces, links and route (we hold the lock: none is live)
            self._built = True
            _run("ip", "link", "add", self.bridge, "type", "bridge")
            _run("ip", "addr", "add", f"{BRIDGE_IP}/24", "dev", self.bridge)
            _run("ip", "link", "set", self.bridge, "up")
            _run("ip", "route", "add", "unreachable", SUBNET)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Kill every process left in the bed's namespaces and remove everything the bed created (idempotent)."""
        try:
            if self._built:
                _remove_leftovers()
                self._built = False
        finally:
            self.nodes.clear()
            if self._lock_file is not None:
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)
                self._lock_file.close()
                self._lock_file = None

    def _lock(self) -> None:
        self._lock_file = open(LOCK_PATH, "w")  # noqa: SIM115 - held until close()
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self._lock_file.close()
                    self._lock_file = None
                    raise NetBedUnavailable(
                        f"another network test bed held {LOCK_PATH} for {self.lock_timeout:.0f}s"
                    ) from None
                time.sleep(0.5)

    # ---- building ----------------------------------------------------------------------------------------------
    def _namespace(self, name: str) -> str:
        if name in self.nodes:
            raise ValueError(f"the bed already has a node named {name!r}")
        if not name.isalnum() or len(name) > 4:
            raise ValueError(f"node names must be 1-4 letters or digits (they go into interface names), got {name!r}")
        namespace = f"{PREFIX}-{self.id}-{name}"
        _run("ip", "netns", "add", namespace)
        _run("ip", "-n", namespace, "link", "set", "lo", "up")
        return namespace

    def _veth(self, name: str, namespace: str, host_namespace: str | None) -> tuple[str, str]:
        inner, outer = f"{PREFIX}{self.id}{name}i", f"{PREFIX}{self.id}{name}o"
        _run("ip", "link", "add", inner, "type", "veth", "peer", "name", outer)
        _run("ip", "link", "set", inner, "netns", namespace)
        if host_namespace is not None:
            _run("ip", "link", "set", outer, "netns", host_namespace)
        return inner, outer

    @staticmethod
    def _ip(namespace: str | None, *args: str) -> None:
        _run("ip", *(["-n", namespace] if namespace else []), *args)

    @staticmethod
    def _limit(namespace: str | None, device: str, rate_mbit: float) -> None:
        # tbf: rate, a burst of at least one MTU-sized packet per timer tick, and a queue of ~50 ms at that rate
        burst = max(16_000, int(rate_mbit * 1e6 / 8 / 250))
        limit = max(3 * burst, int(rate_mbit * 1e6 / 8 * 0.05))
        prefix = ["ip", "netns", "exec", namespace] if namespace else []
        _run(*prefix, "tc", "qdisc", "replace", "dev", device, "root", "tbf", "rate", f"{rate_mbit}mbit",
             "burst", str(burst), "limit", str(limit))  # fmt: skip

    def _attach(self, name: str, namespace: str, rate_mbit: float | None) -> tuple[str, str, str]:
        """A veth from ``namespace`` to the bridge, with the next public address; returns (inner, outer, ip)."""
        inner, outer = self._veth(name, namespace, None)
        ip = f"10.213.0.{self._next_public}"
        self._next_public += 1
        _run("ip", "link", "set", outer, "master", self.bridge, "up")
        self._ip(namespace, "addr", "add", f"{ip}/24", "dev", inner)
        self._ip(namespace, "link", "set", inner, "up")
        if rate_mbit is not None:
            self._limit(namespace, inner, rate_mbit)
            self._limit(None, outer, rate_mbit)
        return inner, outer, ip

    def add_peer(self, name: str, rate_mbit: float | None = None, behind: str | None = None) -> NetNode:
        """A peer's namespace: on the bridge (a public address), or behind the router ``behind`` (a NAT'd LAN).

        Args:
            name: 1-4 letters or digits.
            rate_mbit: The link's rate limit in Mbit/s, each way (None: unlimited).
            behind: The name of a router made by :meth:`add_router`.
        """
        if behind is None:
            namespace = self._namespace(name)
            inner, outer, ip = self._attach(name, namespace, rate_mbit)
            node = NetNode(name, namespace, ip, rate_mbit, inner, outer, None)
        else:
            router = self.nodes.get(behind)
            if router is None or router.kind != "router":
                raise ValueError(f"behind={behind!r} is not a router of this bed; add it with add_router() first")
            namespace = self._namespace(name)
            inner, outer = self._veth(name, namespace, router.namespace)
            lan, host = router.extra["lan"], router.extra["next_host"]
            router.extra["next_host"] += 1
            ip = f"10.213.{lan}.{host}"
            self._ip(router.namespace, "link", "set", outer, "master", router.extra["lan_bridge"], "up")
            self._ip(namespace, "addr", "add", f"{ip}/24", "dev", inner)
            self._ip(namespace, "link", "set", inner, "up")
            self._ip(namespace, "route", "add", "default", "via", f"10.213.{lan}.1")
            if rate_mbit is not None:
                self._limit(namespace, inner, rate_mbit)
                self._limit(router.namespace, outer, rate_mbit)
            node = NetNode(name, namespace, ip, rate_mbit, inner, outer, router.namespace, behind=behind)
        self.nodes[name] = node
        return node

    def add_router(self, name: str, rate_mbit: float | None = None) -> NetNode:
        """A "home router": a namespace on the bridge that NATs (MASQUERADE) a LAN of its own, ``10.213.<n>.0/24``.

        Peers added with ``behind=name`` can dial out to the bridge's addresses; nothing can connect to them.
        """
        namespace = self._namespace(name)
        inner, outer, ip = self._attach(name, namespace, rate_mbit)
        lan = self._next_lan
        self._next_lan += 1
        lan_bridge = "lan"
        self._ip(namespace, "link", "add", lan_bridge, "type", "bridge")
        self._ip(namespace, "addr", "add", f"10.213.{lan}.1/24", "dev", lan_bridge)
        self._ip(namespace, "link", "set", lan_bridge, "up")
        exec_in = ["ip", "netns", "exec", namespace]
        _run(*exec_in, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        _run(*exec_in, "iptables", "-t", "nat", "-A", "POSTROUTING", "-s", f"10.213.{lan}.0/24", "-o", inner,
             "-j", "MASQUERADE")  # fmt: skip
        # a home router forwards replies only: nothing from outside may open a connection into the LAN
        _run(*exec_in, "iptables", "-A", "FORWARD", "-i", inner, "-m", "conntrack", "--ctstate",
             "ESTABLISHED,RELATED", "-j", "ACCEPT")  # fmt: skip
        _run(*exec_in, "iptables", "-A", "FORWARD", "-i", inner, "-j", "DROP")
        node = NetNode(name, namespace, ip, rate_mbit, inner, outer, None, kind="router")
        node.extra.update(lan=lan, next_host=2, lan_bridge=lan_bridge)
        self.nodes[name] = node
        return node

    # ---- using ---------------------------------------------------------------------------------------------------
    def command(self, name: str, command: Sequence[str]) -> list[str]:
        """``command`` run inside the namespace of node ``name`` (``ip netns exec`` execs it: same pid)."""
        return ["ip", "netns", "exec", self.nodes[name].namespace, *command]

    def cut(self, name: str) -> None:
        """Cut node ``name``'s link (``ip link set down`` on its end of the veth pair): packets are dropped."""
        node = self.nodes[name]
        self._ip(node.namespace, "link", "set", node.uplink, "down")

    def restore(self, name: str) -> None:
        """Restore a link cut by :meth:`cut` (its address and, behind a router, its default route come back)."""
        node = self.nodes[name]
        self._ip(node.namespace, "link", "set", node.uplink, "up")
        if node.behind is not None:
            lan = self.nodes[node.behind].extra["lan"]
            _run("ip", "-n", node.namespace, "route", "replace", "default", "via", f"10.213.{lan}.1")

    def can_connect(self, source: str, target_ip: str, port: int, timeout: float = 2.0) -> bool:
        """Whether a TCP connection from node ``source`` to ``target_ip:port`` (inside the bed) is accepted."""
        if not target_ip.startswith("10.213."):
            raise ValueError(f"can_connect only targets addresses inside the bed ({SUBNET}), got {target_ip}")
        script = (
            "import socket,sys\n"
            f"s=socket.socket(); s.settimeout({timeout})\n"
            f"sys.exit(0 if s.connect_ex(({target_ip!r},{port}))==0 else 1)"
        )
        result = subprocess.run(self.command(source, ["python3", "-c", script]), timeout=timeout + 10)
        return result.returncode == 0

    def qdisc(self, name: str) -> str:
        """``tc qdisc show`` of node ``name``'s uplink (to check the rate limit is in place)."""
        node = self.nodes[name]
        return _run("ip", "netns", "exec", node.namespace, "tc", "qdisc", "show", "dev", node.uplink).stdout
