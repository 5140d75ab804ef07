"""The signed metrics record every training peer publishes for monitors: ``{run_id}_metrics[peer]``.

The progress record (:mod:`collab_core.progress`) says what the optimizer needs (step, samples toward it, speed); this
one says what a person watching the run wants: the latest training loss, samples contributed so far, the target batch
size, how the peer is reached and the version it runs. It is a separate key with its own pydantic schema, because
hivemind's ``SchemaValidator`` rejects records with fields its schema does not know.

Records are signed (the subkey holds the publisher's public key), so nobody can overwrite another peer's record;
readers still treat every record as untrusted input (:func:`parse_metrics_records`).
"""

from __future__ import annotations

import importlib.metadata
import math
from dataclasses import dataclass
from typing import Any, Optional

from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from pydantic.v1 import BaseModel, StrictBool, StrictBytes, StrictFloat, conint, conlist, constr

from collab_core.records import parse_dictionary_entries

__all__ = [
    "METRICS_KEY_SUFFIX",
    "MAX_MADDRS",
    "PeerMetrics",
    "PeerMetricsRecord",
    "CollabMetricsSchema",
    "metrics_key",
    "package_version",
    "metrics_validator",
    "parse_metrics_records",
]

#: the DHT key of a run's metrics records is ``f"{run_id}{METRICS_KEY_SUFFIX}"``
METRICS_KEY_SUFFIX = "_metrics"
#: at most this many addresses are published per peer (the rest are of no use to a person reading a table)
MAX_MADDRS = 8
#: records stamped further than this in the future (seconds) are not trusted
MAX_CLOCK_SKEW = 60.0


class PeerMetricsRecord(BaseModel):
    """The wire format of one metrics record (strict types: hivemind's schema validation requires them)."""

    peer_id: StrictBytes
    step: conint(ge=0, strict=True)  # type: ignore[valid-type]
    loss: Optional[StrictFloat] = None  # noqa: UP045 - pydantic v1 needs it
    samples_per_second: StrictFloat
    samples_contributed: conint(ge=0, strict=True)  # type: ignore[valid-type]
    target_batch_size: conint(ge=1, strict=True)  # type: ignore[valid-type]
    client_mode: StrictBool
    time: StrictFloat
    version: constr(max_length=32, strict=True) = ""  # type: ignore[valid-type]
    maddrs: conlist(constr(max_length=256, strict=True), max_items=MAX_MADDRS) = []  # type: ignore[valid-type]


class CollabMetricsSchema(BaseModel):
    """The DHT schema of ``{run_id}_metrics``: one signed :class:`PeerMetricsRecord` per peer (None: withdrawn)."""

    metrics: dict[BytesWithPublicKey, Optional[PeerMetricsRecord]]  # noqa: UP045 - pydantic v1 needs it


def package_version() -> str:
    """The installed collab-training version ("" when it is not installed as a package)."""
    try:
        return importlib.metadata.version("collab-training")
    except importlib.metadata.PackageNotFoundError:
        return ""


def metrics_key(run_id: str) -> str:
    """The DHT key of run ``run_id``'s metrics records."""
    return f"{run_id}{METRICS_KEY_SUFFIX}"


def metrics_validator(run_id: str) -> SchemaValidator:
    """The validator to register (``dht.add_validators``) on every DHT node that stores or reads these records."""
    return SchemaValidator(CollabMetricsSchema, prefix=run_id)


@dataclass(frozen=True)
class PeerMetrics:
    """One peer's metrics record, parsed and checked.

    Attributes:
        peer_id: the peer's DHT id (bytes).
        step: its collaborative step.
        loss: its latest training loss (None: the integration supplies none).
        samples_per_second: its own training speed (samples/s over the last seconds).
        samples_contributed: samples it has processed and reported to the collaboration since it started.
        target_batch_size: the run's samples per collaborative step, as this peer is configured.
        client_mode: whether it accepts no incoming connections.
        time: when it published this record (DHT time).
        version: the collab-training version it runs.
        maddrs: the addresses other peers reach it at (empty for a client).
    """

    peer_id: bytes
    step: int
    loss: float | None
    samples_per_second: float
    samples_contributed: int
    target_batch_size: int
    client_mode: bool
    time: float
    version: str = ""
    maddrs: tuple[str, ...] = ()


def parse_metrics_records(entries: Any, now: float) -> tuple[dict[bytes, PeerMetrics], list[str]]:
    """Parse the value of a ``{run_id}_metrics`` DHT key (``{subkey: value}``), skipping malformed records.

    Pure: no network, the caller passes the dictionary ``dht.get`` returned (values unwrapped or
    ``ValueWithExpiration``) and the current DHT time.

    Args:
        entries: ``{subkey: value}``; a value may be wrapped in an object with a ``.value`` attribute.
        now: the current DHT time (records stamped more than a minute later are skipped).

    Returns:
        ``(records by peer id, reasons)``: one reason per skipped record, e.g. ``"malformed (ValidationError)"``.
    """
    records: dict[bytes, PeerMetrics] = {}
    parsed_values, skipped = parse_dictionary_entries(entries, PeerMetricsRecord.parse_obj)
    for parsed in parsed_values:
        numbers = [parsed.samples_per_second, parsed.time] + ([parsed.loss] if parsed.loss is not None else [])
        if not all(math.isfinite(x) for x in numbers) or parsed.samples_per_second < 0:
            skipped.append("non-finite or negative values")
            continue
        if parsed.time > now + MAX_CLOCK_SKEW:
            skipped.append("stamped in the future")
            continue
        if len(parsed.peer_id) > 128:
            skipped.append("an oversized peer id")
            continue
        record = PeerMetrics(
            peer_id=parsed.peer_id,
            step=parsed.step,
            loss=parsed.loss,
            samples_per_second=parsed.samples_per_second,
            samples_contributed=parsed.samples_contributed,
            target_batch_size=parsed.target_batch_size,
            client_mode=parsed.client_mode,
            time=parsed.time,
            version=parsed.version,
            maddrs=tuple(parsed.maddrs),
        )
        previous = records.get(record.peer_id)
        if previous is None or previous.time < record.time:
            records[record.peer_id] = record
    return records, skipped
