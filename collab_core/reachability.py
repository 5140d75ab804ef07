"""Can other peers reach this one? Pure checks of addresses, shared by ``collab doctor`` and peers' start-up."""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterable, Sequence

from collab_core.settings import env_var

__all__ = ["address_kind", "advise_once", "local_networks", "maddr_host", "reachability_advice"]

_SIOCGIFADDR, _SIOCGIFNETMASK = 0x8915, 0x891B  # Linux ioctls: an interface's IPv4 address and netmask


def maddr_host(maddr: str) -> str | None:
    """The IP address of an ``/ip4/...`` or ``/ip6/...`` multiaddr, or None (DNS names, malformed text)."""
    parts = str(maddr).split("/")
    if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
        return parts[2]
    return None


def address_kind(maddr: str) -> str:
    """``"loopback"``, ``"private"``, ``"unspecified"``, ``"public"`` or ``"unknown"`` (e.g. a DNS name)."""
    host = maddr_host(maddr)
    if host is None:
        return "unknown"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return "unknown"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_private or ip.is_link_local:
        return "private"
    return "public"


def local_networks() -> list[ipaddress.IPv4Network]:
    """The IPv4 networks of this machine's interfaces (address + netmask; Linux only: elsewhere empty)."""
    networks = []
    try:
        names = [name for _index, name in socket.if_nameindex()]
    except OSError:
        return []
    import fcntl  # POSIX only; imported here so that the module imports everywhere

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for name in names:
            request = struct.pack("256s", name.encode()[:15])
            try:
                address = socket.inet_ntoa(fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, request)[20:24])
                netmask = socket.inet_ntoa(fcntl.ioctl(probe.fileno(), _SIOCGIFNETMASK, request)[20:24])
            except OSError:  # no IPv4 address on this interface
                continue
            networks.append(ipaddress.IPv4Network(f"{address}/{netmask}", strict=False))
    return networks


def _on_networks(maddr: str, networks: Sequence[ipaddress.IPv4Network]) -> bool:
    try:
        ip = ipaddress.ip_address(maddr_host(maddr) or "")
    except ValueError:
        return False
    return any(ip in network for network in networks if network.version == ip.version)


def reachability_advice(
    own_maddrs: Iterable[str],
    swarm_maddrs: Iterable[str],
    client_mode: bool,
    own_networks: Sequence[ipaddress.IPv4Network] | None = None,
) -> list[str]:
    """What to change so that the swarm's peers can connect to this one (empty: nothing to change).

    Args:
        own_maddrs: the addresses this peer announces.
        swarm_maddrs: addresses of the swarm's peers (initial peers, or those they publish).
        client_mode: whether this peer runs in client mode (then it needs no inbound connections).
        own_networks: the networks of this machine's interfaces (:func:`local_networks`); with them, a swarm of
            private addresses on none of this peer's networks is recognised too: its peers reach this one only
            through a router, and a router that does NAT (a home router) lets no connection in.

    Returns:
        One line of advice per problem found.
    """
    if client_mode:
        return []
    own_maddrs, swarm_maddrs = list(own_maddrs), list(swarm_maddrs)
    own = [kind for kind in map(address_kind, own_maddrs) if kind != "unspecified"]
    swarm = {address_kind(maddr) for maddr in swarm_maddrs}
    if "public" not in swarm:
        private_swarm = [maddr for maddr in swarm_maddrs if address_kind(maddr) == "private"]
        if own and set(own) == {"private"} and private_swarm and own_networks:
            if not any(_on_networks(maddr, own_networks) for maddr in private_swarm):
                nets = " ".join(sorted({str(n) for n in own_networks if not n.is_loopback}))
                return [
                    f"the swarm's peers ({maddr_host(private_swarm[0])}) are not on this peer's networks ({nets}): "
                    "they reach it only through a router, and a router doing NAT (a home router) lets no connection "
                    f"in, so it cannot accept connections. Run it with {env_var('client_mode')}=1 (it dials out "
                    f"only and still contributes), or set {env_var('announce_maddrs')}=/ip4/<the router's address>"
                    "/tcp/<port> with a port forwarded to this machine"
                ]
        return []  # a swarm on this machine or this peer's own network: private addresses are what its peers dial
    if not own:
        return [
            "this peer announces no address, so no peer can connect to it: set "
            f"{env_var('host_maddrs')}=/ip4/0.0.0.0/tcp/31337, or run it with {env_var('client_mode')}=1"
        ]
    if "public" not in own:
        kinds = " and ".join(sorted(set(own)))
        return [
            f"this peer announces only {kinds} addresses to a swarm with public peers: they cannot connect to it. "
            f"Set {env_var('announce_maddrs')}=/ip4/<this machine's public ip>/tcp/<port> (with port forwarding to "
            f"this machine), or run it with {env_var('client_mode')}=1 (it dials out only and still contributes)"
        ]
    return []


_advised = False


def advise_once(
    own_maddrs: Iterable[str],
    swarm_maddrs: Iterable[str],
    client_mode: bool,
    own_networks: Sequence[ipaddress.IPv4Network] | None = None,
) -> str | None:
    """At a peer's start-up: the reachability advice, printed once per process (returns what was printed, if any).

    Called by :func:`collab_core.start_dht` after the DHT started; ``collab doctor`` runs the same check with the
    addresses the swarm's peers publish.
    """
    global _advised
    if _advised:
        return None
    advice = reachability_advice(own_maddrs, swarm_maddrs, client_mode, own_networks)
    if not advice:
        return None
    _advised = True
    text = "[collaborative] reachability: " + " ".join(advice) + " (run `collab doctor` for a full check)"
    print(text, flush=True)
    return text
