"""Starting the hivemind DHT for a collaborative run and telling other peers how to join it."""

from __future__ import annotations

import ipaddress
import shlex
from typing import Any

import hivemind

from collab_core import hivemind_patches
from collab_core.settings import CollaborativeSettings, env_var

__all__ = ["DHTStartupError", "join_hint", "start_dht"]


class DHTStartupError(RuntimeError):
    """Raised when the DHT cannot be started, joined, or reused."""


def start_dht(
    settings: CollaborativeSettings,
    dht: hivemind.DHT | None = None,
    *,
    print_hint: bool = True,
    startup_timeout: float = 30.0,
) -> tuple[hivemind.DHT, str]:
    """Start (or reuse) the DHT of a collaborative run and build the hint other peers need to join it.

    A new DHT is started from the network settings (``initial_peers``, ``host_maddrs``, ``announce_maddrs``,
    ``client_mode``, ``identity_path``, ``use_ipfs``). Start-up is bounded: if the DHT is not ready within
    ``startup_timeout`` seconds (for example because no initial peer can be reached), its background process is shut
    down and :class:`DHTStartupError` is raised, naming the addresses and what to check.

    It first applies collab_core's hivemind workarounds (:func:`collab_core.hivemind_patches.apply`), so that a DHT
    it starts runs with them; a ``dht`` passed in was forked when it started and has them only if they were applied
    before that.

    Args:
        settings: The peer's settings.
        dht: An already running DHT to use instead of starting one. The network settings are then ignored.
        print_hint: Print the join hint to stdout.
        startup_timeout: Seconds to wait for the DHT to start and reach its initial peers.

    Returns:
        The running DHT and the join hint (see :func:`join_hint`).

    Raises:
        DHTStartupError: If the given ``dht`` is not running, or a new DHT fails to start or join in time.
    """
    if startup_timeout <= 0:
        raise ValueError(f"startup_timeout must be > 0, got {startup_timeout!r}")
    hivemind_patches.apply()  # before the DHT process is forked, so that it runs with the workarounds
    if dht is None:
        dht = _start_new_dht(settings, startup_timeout)
    else:
        _check_running(dht, startup_timeout)

    hint = join_hint(dht, settings)
    if print_hint:
        print(hint, flush=True)
    if not dht.client_mode:  # can the peers we join connect back to us? (advice printed once per process)
        from collab_core.metrics_publisher import reachable_maddrs
        from collab_core.reachability import advise_once, local_networks

        advise_once(reachable_maddrs(dht), settings.initial_peers, settings.client_mode, local_networks())
    return dht, hint


def _dht_kwargs(settings: CollaborativeSettings, startup_timeout: float) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "initial_peers": list(settings.initial_peers),
        # a client accepts no incoming connections, so it listens nowhere (host_maddrs would only open a port)
        "host_maddrs": [] if settings.client_mode else list(settings.host_maddrs),
        "client_mode": settings.client_mode,
        "use_ipfs": settings.use_ipfs,
        # forwarded to hivemind.p2p.P2P.create: bounds how long the p2pd daemon may take to start and bootstrap,
        # so that the daemon gives up (and cleans up after itself) by the time we stop waiting for it
        "startup_timeout": startup_timeout,
    }
    if settings.announce_maddrs:
        kwargs["announce_maddrs"] = list(settings.announce_maddrs)
    if settings.identity_path is not None:
        kwargs["identity_path"] = settings.identity_path
    return kwargs


def _start_new_dht(settings: CollaborativeSettings, startup_timeout: float) -> hivemind.DHT:
    dht = hivemind.DHT(start=True, await_ready=False, **_dht_kwargs(settings, startup_timeout))
    try:
        dht.wait_until_ready(timeout=startup_timeout)
    except BaseException as e:
        _stop(dht)
        if not isinstance(e, Exception):
            raise
        raise DHTStartupError(_startup_failure_message(settings, startup_timeout, e)) from e
    return dht


def _stop(dht: hivemind.DHT) -> None:
    dht.shutdown()
    if dht.is_alive():  # shutdown() terminates a stuck process but does not wait for it to exit
        dht.join(timeout=5)


def _startup_failure_message(settings: CollaborativeSettings, startup_timeout: float, error: BaseException) -> str:
    reason = f"timed out after {startup_timeout:g} s" if isinstance(error, TimeoutError) else repr(error)
    if settings.initial_peers:
        peers = " ".join(settings.initial_peers)
        return (
            f"Could not join the collaborative run through initial_peers ({env_var('initial_peers')}) {peers}: "
            f"{reason}. Check that (1) each address was copied in full, including /p2p/<peer id>, from the join hint "
            "printed by a peer of this run, (2) that peer is still running and is not in client mode, and (3) its "
            "host and port are reachable from this machine (firewall, NAT; the other peer may need announce_maddrs "
            "set to its public address). The DHT started for this attempt has been shut down."
        )
    return (
        f"Could not start the DHT on host_maddrs {' '.join(settings.host_maddrs)}: {reason}. Check that the "
        "addresses belong to this machine and their ports are free (use port 0 to pick a free one)"
        + (", and that identity_path is not used by another running peer" if settings.identity_path else "")
        + ". The DHT started for this attempt has been shut down."
    )


def _check_running(dht: hivemind.DHT, startup_timeout: float) -> None:
    if not dht.is_alive():
        raise DHTStartupError(
            "The DHT passed as dht= is not running (it was never started or has been shut down). Start it first "
            "with dht.run_in_background() or create it with hivemind.DHT(..., start=True), or pass dht=None to let "
            "start_dht() create one from the settings."
        )
    try:
        dht.wait_until_ready(timeout=startup_timeout)
    except Exception as e:
        raise DHTStartupError(f"The DHT passed as dht= did not become ready: {e!r}") from e


def _is_unspecified(maddr: Any) -> bool:
    for protocol in ("ip4", "ip6"):
        try:
            host = maddr.value_for_protocol(protocol)
        except Exception:  # the protocol is not part of this address
            continue
        if ipaddress.ip_address(host).is_unspecified:
            return True
    return False


def _is_loopback(maddr: Any) -> bool:
    for protocol in ("ip4", "ip6"):
        try:
            return ipaddress.ip_address(maddr.value_for_protocol(protocol)).is_loopback
        except Exception:  # the protocol is not part of this address
            continue
    return False


def _exports(run_id: str, peers: list[str]) -> str:
    return f'{env_var("run_id")}={shlex.quote(run_id)} {env_var("initial_peers")}="{" ".join(peers)}"'


def join_hint(dht: hivemind.DHT, settings: CollaborativeSettings) -> str:
    """Describe the environment a second peer needs to join this run through ``dht``.

    Uses the DHT's visible multiaddrs (never unspecified ``0.0.0.0`` / ``::`` addresses). A peer in client mode does
    not accept incoming connections, so it cannot be an initial peer; the hint then says so and points at the peers
    this one joined through, if any.

    Args:
        dht: A running DHT.
        settings: The settings of this peer (``run_id`` and, for client peers, ``initial_peers`` are used).

    Returns:
        A multi-line, human-readable hint, e.g.::

            To join this run from another peer, set:
              COLLAB_RUN_ID=collab COLLAB_INITIAL_PEERS="/ip4/203.0.113.5/tcp/31337/p2p/12D3KooW..."
    """
    if dht.client_mode:
        lines = [
            "This peer runs in client mode: it accepts no incoming connections, so it cannot be an initial peer "
            "for other peers. Use the addresses of a non-client peer of this run instead."
        ]
        if settings.initial_peers:
            lines += [
                "To join this run from another peer, set (the peers this one joined through):",
                "  " + _exports(settings.run_id, list(settings.initial_peers)),
            ]
        return "\n".join(lines)

    try:
        maddrs = [maddr for maddr in dht.get_visible_maddrs() if not _is_unspecified(maddr)]
    except ValueError:  # hivemind raises ValueError when the daemon reports no addresses at all
        maddrs = []
    if not maddrs:
        return (
            "This peer has no address other peers can connect to, so it cannot be an initial peer; set host_maddrs "
            "(e.g. /ip4/0.0.0.0/tcp/31337) or announce_maddrs to a reachable address."
        )
    maddrs.sort(key=_is_loopback)  # stable: addresses reachable from other machines first
    lines = [
        "To join this run from another peer, set:",
        "  " + _exports(settings.run_id, [str(maddr) for maddr in maddrs]),
    ]
    if all(_is_loopback(maddr) for maddr in maddrs):
        lines.append(
            "(These addresses only work from this machine. To accept peers from other machines, listen on a public "
            f"interface by setting {env_var('host_maddrs')} (e.g. to /ip4/0.0.0.0/tcp/31337), or set "
            f"{env_var('announce_maddrs')} to this machine's public address.)"
        )
    return "\n".join(lines)
