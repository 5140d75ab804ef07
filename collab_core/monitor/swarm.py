"""The swarm's state as a monitor shows it, computed from the peers' records (pure: no network, no clock).

Inputs are what one read of the DHT returned: the progress records (``{run_id}_progress``, what the optimizers
act on) and the metrics records (``{run_id}_metrics``, :mod:`collab_core.peer_metrics`). Malformed records of
either kind are skipped and counted; they never make the state fail.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from collab_core.peer_metrics import MAX_CLOCK_SKEW, PeerMetrics
from collab_core.progress import MAX_PEER_ID_BYTES, CollabTrainingProgress
from collab_core.records import PeerRecord, parse_dictionary_entries
from collab_core.reporting import eta_seconds

__all__ = ["PeerRow", "SwarmState", "build_state", "parse_progress_records", "peer_id_text", "short_peer_id"]

#: characters of a base58 peer id shown in tables and used as the Prometheus label
SHORT_ID_LENGTH = 8
#: a peer silent for longer than this (seconds) no longer counts toward the collaboration's samples/s (a crashed
#: peer's records stay in the DHT until they expire; a training peer publishes every second, or after its round)
RATE_FRESH_SECONDS = 10.0


def peer_id_text(peer_id: bytes) -> str:
    """A peer id as the base58 text libp2p shows (the raw bytes in hex if they are not a valid peer id)."""
    try:
        from hivemind.p2p import PeerID

        return PeerID(peer_id).to_base58()
    except Exception:
        return peer_id.hex()


def short_peer_id(peer_id: str) -> str:
    """The last ``SHORT_ID_LENGTH`` characters of a base58 peer id (its start is the same for every peer)."""
    return peer_id[-SHORT_ID_LENGTH:]


def parse_progress_records(entries: Any, now: float) -> tuple[dict[bytes, PeerRecord], list[str]]:
    """Parse the value of a ``{run_id}_progress`` DHT key, skipping malformed records (the optimizer's rules).

    Args:
        entries: ``{subkey: value}`` (values possibly wrapped in an object with ``.value``), or None.
        now: the current DHT time.

    Returns:
        ``(records by peer id, reasons)``: one reason per skipped record.
    """
    records: dict[bytes, PeerRecord] = {}
    parsed_values, skipped = parse_dictionary_entries(entries, CollabTrainingProgress.parse_obj)
    for parsed in parsed_values:
        if not math.isfinite(parsed.samples_per_second) or not math.isfinite(parsed.time):
            skipped.append("non-finite values")
            continue
        if parsed.time > now + MAX_CLOCK_SKEW or len(parsed.peer_id) > MAX_PEER_ID_BYTES:
            skipped.append("stamped in the future or an oversized peer id")
            continue
        if parsed.epoch < 0 or parsed.samples_accumulated < 0:
            skipped.append("negative counts")
            continue
        record = PeerRecord(
            parsed.peer_id,
            parsed.epoch,
            parsed.samples_accumulated,
            max(0.0, parsed.samples_per_second),
            parsed.time,
            parsed.client_mode,
            parsed.fingerprint,
        )
        if record.peer_id not in records or records[record.peer_id].time < record.time:
            records[record.peer_id] = record
    return records, skipped


@dataclass(frozen=True)
class PeerRow:
    """One line of the peer table.

    Attributes:
        peer_id: base58 peer id.
        short_id: its last characters (table, Prometheus label).
        step: the collaborative step the peer is on.
        samples: samples it accumulated toward that step (progress record; None without one).
        samples_per_second: its training speed.
        samples_contributed: samples it has contributed since it started (metrics record; None without one).
        loss: its latest training loss (None if unknown).
        client_mode: whether it accepts no incoming connections.
        reached_at: how other peers reach it: its addresses, or that it only dials out.
        last_seen: seconds since its newest record.
        version: the collab-training version it runs ("" if unknown).
        silent: no record for more than ``RATE_FRESH_SECONDS`` (crashed, or stuck in a long round); listed until its
            records expire, as the optimizers do, but not counted toward the collaboration's samples/s.
    """

    peer_id: str
    short_id: str
    step: int
    samples: int | None
    samples_per_second: float
    samples_contributed: int | None
    loss: float | None
    client_mode: bool
    reached_at: str
    last_seen: float
    version: str = ""
    silent: bool = False


@dataclass(frozen=True)
class SwarmState:
    """The collaboration as one monitor read shows it (``GET /api/state`` is :meth:`to_json`).

    Attributes:
        run_id: the run's name.
        time: the DHT time of the read.
        step: the newest collaborative step of a peer that can share its state (as the optimizers count it).
        target_batch_size: samples per step (from the peers' metrics records; None before any).
        samples_accumulated: samples all peers accumulated toward ``step``.
        samples_per_second: the collaboration's throughput: the sum of the own rates of the peers heard from in the
            last ``RATE_FRESH_SECONDS``.
        eta_seconds: estimated seconds to the next step (None: unknown).
        loss: the mean of the peers' latest losses (None: none published).
        peers: one row per peer, ordered by peer id.
        skipped_records: malformed records skipped in this read.
        error: why the read failed ("" when it did not).
    """

    run_id: str
    time: float
    step: int
    target_batch_size: int | None
    samples_accumulated: int
    samples_per_second: float
    eta_seconds: float | None
    loss: float | None
    peers: tuple[PeerRow, ...] = ()
    skipped_records: int = 0
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_peers(self) -> int:
        return len(self.peers)

    @property
    def num_clients(self) -> int:
        return sum(peer.client_mode for peer in self.peers)

    @property
    def num_silent(self) -> int:
        return sum(peer.silent for peer in self.peers)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: every attribute plus ``num_peers``, ``num_clients`` and ``num_silent``."""
        data = asdict(self)
        data.pop("extra")
        data["peers"] = [asdict(peer) for peer in self.peers]
        data["num_peers"], data["num_clients"], data["num_silent"] = self.num_peers, self.num_clients, self.num_silent
        data.update(self.extra)
        return data


def _reached_at(metrics: PeerMetrics | None, client_mode: bool) -> str:
    if client_mode:
        return "client mode (dials out only)"
    if metrics is None:
        return "unknown (no metrics record)"
    return " ".join(metrics.maddrs) or "no address published"


def build_state(
    run_id: str,
    progress: dict[bytes, PeerRecord],
    metrics: dict[bytes, PeerMetrics],
    now: float,
    *,
    skipped_records: int = 0,
    expiration: float | None = None,
) -> SwarmState:
    """The swarm's state from one read of its records.

    Args:
        run_id: the run's name.
        progress: progress records by peer id.
        metrics: metrics records by peer id.
        now: the DHT time of the read.
        skipped_records: how many malformed records the read skipped.
        expiration: drop metrics-only peers whose record is older than this (seconds); None keeps them.

    Returns:
        The state; a peer appears if it has a progress record, or a fresh metrics record.
    """
    peer_ids = set(progress)
    for peer_id, published in metrics.items():
        if peer_id in progress or expiration is None or now - published.time <= expiration:
            peer_ids.add(peer_id)
    rows = []
    for peer_id in peer_ids:
        record, metric = progress.get(peer_id), metrics.get(peer_id)
        times = [r.time for r in (record, metric) if r is not None]
        step = record.step if record is not None else metric.step if metric is not None else 0
        client = record.client_mode if record is not None else bool(metric and metric.client_mode)
        rate = metric.samples_per_second if metric is not None else record.samples_per_second if record else 0.0
        text_id = peer_id_text(peer_id)
        rows.append(
            PeerRow(
                peer_id=text_id,
                short_id=short_peer_id(text_id),
                step=step,
                samples=record.samples if record is not None else None,
                samples_per_second=float(rate),
                samples_contributed=metric.samples_contributed if metric is not None else None,
                loss=metric.loss if metric is not None else None,
                client_mode=client,
                reached_at=_reached_at(metric, client),
                last_seen=max(0.0, now - max(times)),
                version=metric.version if metric is not None else "",
                silent=now - max(times) > RATE_FRESH_SECONDS,
            )
        )
    rows.sort(key=lambda row: row.peer_id)
    servers = [r.step for r in progress.values() if not r.client_mode]
    step = max(servers or [r.step for r in progress.values()] or [0])
    accumulated = sum(r.samples for r in progress.values() if r.step == step)
    targets = Counter(m.target_batch_size for m in metrics.values())
    target = targets.most_common(1)[0][0] if targets else None
    rate = sum(row.samples_per_second for row in rows if not row.silent)
    eta = eta_seconds(max(0, target - accumulated), rate) if target is not None and rate > 0 else None
    losses = [row.loss for row in rows if row.loss is not None]
    return SwarmState(
        run_id=run_id,
        time=now,
        step=step,
        target_batch_size=target,
        samples_accumulated=accumulated,
        samples_per_second=rate,
        eta_seconds=eta,
        loss=sum(losses) / len(losses) if losses else None,
        peers=tuple(rows),
        skipped_records=skipped_records,
    )
