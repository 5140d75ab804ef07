"""``collab doctor``: checks what most often breaks joining a collaboration, and the fix for each.

Every decision is a pure function of what was probed (``*_findings``), unit-tested on fabricated inputs; the probes
(:func:`run_doctor`) start a DHT node with hivemind and read the swarm's published records.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass

from collab_core.reachability import maddr_host, reachability_advice
from collab_core.settings import env_var

__all__ = ["Finding", "clock_findings", "format_findings", "run_doctor", "version_findings"]

#: swarm records stamped this far ahead of this machine's clock mean the clocks disagree (seconds)
CLOCK_SKEW_WARNING = 10.0


@dataclass(frozen=True)
class Finding:
    """One check's result: ``ok`` or not, what was seen, and the fix when it is not ok."""

    check: str
    ok: bool
    detail: str
    fix: str = ""


def _tcp_port(maddr: str) -> int | None:
    parts = str(maddr).split("/")
    if "tcp" in parts and parts.index("tcp") + 1 < len(parts):
        try:
            return int(parts[parts.index("tcp") + 1])
        except ValueError:
            return None
    return None


def tcp_probe(maddr: str, timeout: float = 3.0) -> str:
    """Try a TCP connection to the host and port of ``maddr``: ``"open"``, or why not (a diagnostic only)."""
    host, port = maddr_host(maddr), _tcp_port(maddr)
    if host is None or port is None:
        return "not an /ip4|ip6/.../tcp/... address"
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return "open"
    except TimeoutError:
        return f"no answer within {timeout:g} s (a firewall drops it, or the host is down)"
    except OSError as e:
        return e.strerror or type(e).__name__


def initial_peer_findings(joined: bool, probes: dict[str, str], error: str = "") -> list[Finding]:
    """From the join attempt and a TCP probe per initial peer (pure)."""
    if joined:
        return [Finding("initial peers", True, f"joined the DHT through {len(probes)} address(es)")]
    lines = [f"{maddr}: TCP connect: {result}" for maddr, result in probes.items()]
    return [
        Finding(
            "initial peers",
            False,
            "could not join the DHT through any initial peer. Tried: "
            + "; ".join(lines)
            + (f" ({error})" if error else ""),
            f"copy {env_var('initial_peers')} again in full (with /p2p/<peer id>) from the join hint of a running, "
            "non-client peer of the run; check that its host and port are reachable from here (firewall, NAT; that "
            f"peer may need {env_var('announce_maddrs')} set to its public address)",
        )
    ]


def clock_findings(record_times: Iterable[float], now: float) -> list[Finding]:
    """Compare the newest swarm record's time stamp with this machine's clock (pure).

    Peers republish their records about every second, so the newest one is at most a few seconds old; one stamped
    in the future means the clocks disagree.
    """
    times = list(record_times)
    if not times:
        return [Finding("clock", True, "no swarm records to compare the clock with")]
    skew = max(times) - now
    if skew > CLOCK_SKEW_WARNING:
        return [
            Finding(
                "clock",
                False,
                f"the swarm's newest record is stamped {skew:.0f} s ahead of this machine's clock",
                "synchronise the clock (e.g. enable NTP: timedatectl set-ntp true); records are judged by their time "
                "stamps, and a skewed clock makes this peer's records look stale or from the future to the others",
            )
        ]
    return [Finding("clock", True, f"in step with the swarm (newest record {max(0.0, -skew):.1f} s old)")]


def version_findings(own: str, swarm_versions: Iterable[str]) -> list[Finding]:
    """Compare this installation's collab-training version with the swarm peers' (pure)."""
    versions = sorted({v for v in swarm_versions if v})
    if not versions:
        return [Finding("version", True, f"this machine runs {own or 'an unknown version'}; no peer published one")]
    other = [v for v in versions if v != own]
    if other:
        return [
            Finding(
                "version",
                False,
                f"this machine runs collab-training {own or '(unknown)'}, the swarm's peers run {', '.join(versions)}",
                f"install the swarm's version (pip install collab-training=={other[0]}) so that records and states "
                "are understood the same way",
            )
        ]
    return [Finding("version", True, f"collab-training {own}, as the swarm's peers")]


def address_findings(own: list[str], swarm: list[str], client_mode: bool) -> list[Finding]:
    """Whether the swarm's peers can connect to this machine, from the addresses (pure)."""
    advice = reachability_advice(own, swarm, client_mode)
    if advice:
        return [
            Finding(
                "inbound connections",
                False,
                f"announced addresses: {' '.join(own) or 'none'}",
                " ".join(advice),
            )
        ]
    detail = "client mode: no inbound connections needed" if client_mode else f"announced: {' '.join(own) or 'none'}"
    return [Finding("inbound connections", True, detail)]


def format_findings(findings: list[Finding]) -> str:
    """The report: one ``[ok]``/``[FIX]`` line per check, with the fix under it."""
    lines = []
    for finding in findings:
        lines.append(f"[{'ok' if finding.ok else 'FIX'}] {finding.check}: {finding.detail}")
        if not finding.ok and finding.fix:
            lines.append(f"      fix: {finding.fix}")
    return "\n".join(lines)


def run_doctor(
    initial_peers: list[str], run_id: str | None, *, client_mode: bool = False, timeout: float = 10.0
) -> list[Finding]:
    """Probe: join the DHT (hivemind) through ``initial_peers``, read the run's metrics records, check each point."""
    from hivemind.utils import get_dht_time

    from collab_core.dht import DHTStartupError
    from collab_core.metrics_publisher import reachable_maddrs
    from collab_core.monitor.reader import join_as_observer
    from collab_core.peer_metrics import metrics_key, metrics_validator, package_version, parse_metrics_records

    findings: list[Finding] = []
    own_version = package_version()
    try:
        dht = join_as_observer(run_id or "collab", initial_peers, client_mode=client_mode, timeout=timeout)
    except DHTStartupError as e:
        probes = {maddr: tcp_probe(maddr) for maddr in initial_peers}
        return initial_peer_findings(False, probes, error=str(e).split(":")[-1].strip()[:80])
    try:
        if initial_peers:
            findings += initial_peer_findings(True, {maddr: "open" for maddr in initial_peers})
        else:
            findings.append(
                Finding("initial peers", True, "none given: only this machine was checked (pass --initial-peers)")
            )
        own = reachable_maddrs(dht)
        records: dict = {}
        if run_id:
            dht.add_validators([metrics_validator(run_id)])
            from hivemind.dht.crypto import RSASignatureValidator

            dht.add_validators([RSASignatureValidator()])
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:  # records of a running swarm arrive within a second or two
                found = dht.get(metrics_key(run_id), latest=True)
                records, _skipped = parse_metrics_records(getattr(found, "value", None), get_dht_time())
                if records:
                    break
                time.sleep(0.5)
        swarm_maddrs = list(initial_peers) + [m for record in records.values() for m in record.maddrs]
        findings += address_findings(own, swarm_maddrs, client_mode)
        findings += clock_findings([record.time for record in records.values()], get_dht_time())
        findings += version_findings(own_version, [record.version for record in records.values()])
        if run_id and not records:
            findings.append(
                Finding("run", False, f"no peer of run {run_id!r} published a metrics record", "check --run-id")
            )
    finally:
        dht.shutdown()
    return findings
