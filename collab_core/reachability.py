"""Can other peers reach this one? Pure checks of addresses, shared by ``collab doctor`` and peers' start-up."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from collab_core.settings import env_var

__all__ = ["address_kind", "advise_once", "maddr_host", "reachability_advice"]


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


def reachability_advice(own_maddrs: Iterable[str], swarm_maddrs: Iterable[str], client_mode: bool) -> list[str]:
    """What to change so that the swarm's peers can connect to this one (empty: nothing to change).

    Args:
        own_maddrs: the addresses this peer announces.
        swarm_maddrs: addresses of the swarm's peers (initial peers, or those they publish).
        client_mode: whether this peer runs in client mode (then it needs no inbound connections).

    Returns:
        One line of advice per problem found.
    """
    if client_mode:
        return []
    own = [kind for kind in map(address_kind, own_maddrs) if kind != "unspecified"]
    swarm = {address_kind(maddr) for maddr in swarm_maddrs}
    if "public" not in swarm:
        return []  # a swarm on this machine or a private network: private addresses are what its peers dial
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


def advise_once(own_maddrs: Iterable[str], swarm_maddrs: Iterable[str], client_mode: bool) -> str | None:
    """At a peer's start-up: the reachability advice, printed once per process (returns what was printed, if any).

    Called by :func:`collab_core.start_dht` after the DHT started; ``collab doctor`` runs the same check with the
    addresses the swarm's peers publish.
    """
    global _advised
    if _advised:
        return None
    advice = reachability_advice(own_maddrs, swarm_maddrs, client_mode)
    if not advice:
        return None
    _advised = True
    text = "[collaborative] reachability: " + " ".join(advice) + " (run `collab doctor` for a full check)"
    print(text, flush=True)
    return text
