"""Collaboration progress: who is training, at which collaborative step, with how many samples.

Each peer publishes a small signed record ``{prefix}_progress[peer] = (step, samples, samples/s, time, client_mode)``
in the DHT; everyone reads all records to decide when the collaboration has accumulated ``target_batch_size``.

:class:`CollaborationTracker` is hivemind's :class:`~hivemind.optim.progress_tracker.ProgressTracker` (its
background thread publishes this peer's record whenever it changes and re-reads everybody's records on a schedule
derived from the estimated time to the next step) with three changes that our promises need:

* :meth:`CollaborationTracker.fetch_now` reads the records synchronously. The optimizer steps only on a count read
  *after* this peer reached the target, never on the background estimate alone (a stale view made hivemind peers
  take solo steps).
* The parsed view keeps every peer's record (:class:`CollaborationView`), so the optimizer can count the samples and
  the peers of *its own* step, and notice peers that are ahead of it.
* Records that are malformed or absurd (wrong types, non-finite rates, timestamps far in the future) are skipped
  with a warning instead of raising inside the background thread.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from hivemind.dht import DHT
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.optim.progress_tracker import GlobalTrainingProgress, LocalTrainingProgress, ProgressTracker
from hivemind.utils import ValueWithExpiration, get_dht_time
from pydantic.v1 import BaseModel, constr

from collab_core.fingerprint import FINGERPRINT_LENGTH
from collab_core.log import get_logger
from collab_core.records import PeerRecord
from collab_core.reporting import ProgressSnapshot, RateMeter, StatusSnapshot, StatusThrottle, eta_seconds, status_line

logger = get_logger(__name__)

#: records stamped further than this in the future (seconds) are not trusted
MAX_CLOCK_SKEW = 60.0
#: a libp2p peer id takes 34-39 bytes; longer ones in a record are not trusted (they only cost memory and time)
MAX_PEER_ID_BYTES = 128


class CollabTrainingProgress(LocalTrainingProgress):
    """hivemind's progress record plus this peer's state fingerprint (peers of other versions ignore the field)."""

    fingerprint: constr(max_length=FINGERPRINT_LENGTH, strict=True) = ""  # type: ignore[valid-type]


class CollabProgressSchema(BaseModel):
    """The DHT schema of the progress records with a fingerprint.

    hivemind's ``SchemaValidator`` rejects a record that its schema would change when parsing, and its schema
    (``TrainingProgressSchema``) drops unknown fields: a record with a fingerprint fails it. DHT nodes validate with
    every schema registered for a key and accept a record that one of them matches, so this one is registered
    beside hivemind's (records of older peers still match hivemind's).
    """

    progress: dict[BytesWithPublicKey, Optional[CollabTrainingProgress]]  # noqa: UP045 - pydantic v1 needs it


@dataclass
class CollaborationView(GlobalTrainingProgress):
    """The collaboration as seen in one read of the progress records (this peer's own record is always current).

    ``epoch`` is the newest collaborative step announced by a peer that can share its state (not a client), and
    ``samples_accumulated`` counts samples toward that step, as in hivemind. Use :meth:`samples_at`/:meth:`peers_at`
    for the step this peer is on.
    """

    peers: tuple[PeerRecord, ...] = ()
    fetched_at: float = 0.0
    local_peer_id: bytes = b""
    extra: dict[str, Any] = field(default_factory=dict)

    def peers_at(self, step: int) -> tuple[PeerRecord, ...]:
        """Peers whose latest record is for collaborative step ``step``."""
        return tuple(peer for peer in self.peers if peer.step == step)

    def samples_at(self, step: int) -> int:
        """Samples accumulated toward collaborative step ``step`` by all peers (as last reported)."""
        return sum(peer.samples for peer in self.peers_at(step))

    def estimated_samples_at(self, step: int, now: float) -> float:
        """Like :meth:`samples_at`, extrapolating other peers' counts by their reported speed since their report."""
        total = 0.0
        for peer in self.peers_at(step):
            elapsed = 0.0 if peer.peer_id == self.local_peer_id else max(0.0, now - peer.time)
            total += peer.samples + elapsed * peer.samples_per_second
        return total

    @property
    def samples_per_second(self) -> float:
        """The collaboration's throughput: the sum of every peer's reported samples per second."""
        return sum(peer.samples_per_second for peer in self.peers)

    def peers_ahead_of(self, step: int) -> tuple[PeerRecord, ...]:
        """Peers (able to share state) that already took collaborative steps beyond ``step``."""
        return tuple(peer for peer in self.peers if peer.step > step and not peer.client_mode)


class CollaborationTracker(ProgressTracker):
    """hivemind's ProgressTracker with a synchronous fetch and a per-peer view (see the module docstring)."""

    local_progress: LocalTrainingProgress

    def __init__(self, dht: DHT, prefix: str, target_batch_size: int, *, fingerprint: str = "", **kwargs: Any):
        #: this peer's state fingerprint, published with every record (set it before ``update_epoch``)
        self.fingerprint = fingerprint
        # before hivemind's own validator, so that this peer's first record is accepted by its own DHT node
        dht.add_validators([SchemaValidator(CollabProgressSchema, prefix=prefix)])
        self._known_peers: frozenset[bytes] = frozenset()
        self._ignored_records: set[tuple[Any, str]] = set()  # (subkey, reason) already warned about
        self.last_published = -math.inf  # DHT time of the last record handed to the reporter thread
        super().__init__(dht, prefix, target_batch_size, **kwargs)

    def report_local_progress(
        self, local_epoch: int, samples_accumulated: int, update_global_samples: bool = True, publish: bool = True
    ) -> None:
        """Update this peer's progress; with ``publish=False`` only locally, without waking the reporter thread.

        hivemind publishes every report, i.e. a DHT store per micro-batch, which costs the training loop CPU time
        (measured: a solo peer's loop ran 3.5x slower than plain PyTorch, about 2x without these stores). Records
        matter to others only near the target, so the optimizer publishes there, and otherwise at most every
        ``min_refresh_period``.
        """
        if publish:
            super().report_local_progress(local_epoch, samples_accumulated, update_global_samples)
            self.last_published = get_dht_time()
            return
        if samples_accumulated > self.local_progress.samples_accumulated:
            self.performance_ema.update(task_size=samples_accumulated - self.local_progress.samples_accumulated)
        else:
            self.performance_ema.reset_timer()
        self.local_progress = self._get_local_progress(local_epoch, samples_accumulated)

    def _get_local_progress(self, local_epoch: int, samples_accumulated: int) -> CollabTrainingProgress:
        return CollabTrainingProgress(
            peer_id=self.dht.peer_id.to_bytes(),
            epoch=local_epoch,
            samples_accumulated=samples_accumulated,
            samples_per_second=self.performance_ema.samples_per_second,
            time=get_dht_time(),
            client_mode=self.client_mode,
            fingerprint=getattr(self, "fingerprint", ""),  # hivemind's __init__ calls this before ours sets it
        )

    @property
    def view(self) -> CollaborationView:
        """The latest view (from the background refresh or the last :meth:`fetch_now`)."""
        return self.global_progress  # type: ignore[return-value]

    def fetch_now(self, timeout: float) -> CollaborationView:
        """Read every peer's record from the DHT now (at most ``timeout`` seconds) and return the fresh view.

        Raises:
            TimeoutError: if the DHT did not answer in time.
        """
        future = self.dht.get(self.training_progress_key, latest=True, return_future=True)
        result = future.result(timeout=timeout)
        metadata = result.value if isinstance(result, ValueWithExpiration) else None
        with self.lock_global_progress:
            self.global_progress = self._parse_swarm_progress_data(metadata)
            self.fetched_global_progress_this_epoch.set()
        self.global_state_updated.set()  # let the background fetcher re-plan its next refresh from the new view
        return self.view

    def announce(self, timeout: float) -> None:
        """Publish this peer's current record now, even with no samples yet.

        hivemind's reporter only publishes a peer once it has accumulated samples, so a peer that just joined or
        downloaded the state would stay invisible for a micro-batch and miss the next step's group.
        """
        progress = self.local_progress
        self.last_published = get_dht_time()
        self.dht.store(
            self.training_progress_key,
            subkey=self._local_public_key,
            value=progress.dict(),
            expiration_time=get_dht_time() + self.metadata_expiration,
            return_future=True,
        ).result(timeout=timeout)

    def run(self) -> None:
        """The background thread: hivemind's reporter and fetcher coroutines; their executor is shut down after.

        Workaround (hivemind 1.1.12, ``ProgressTracker.run``): hivemind never shuts down the loop's default executor
        (which the coroutines use to wait on events), so its threads outlive the tracker, 3-4 threads per tracker and
        so per ``fit``. Here the executor is shut down before ``shutdown_complete`` is set. The loop itself is left
        open: hivemind futures bound to it may still be garbage-collected later, and they touch their loop then.
        """
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(asyncio.gather(self._progress_reporter(), self._progress_fetcher()))
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            self.shutdown_complete.set()

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop the background thread and withdraw this peer's record, waiting (up to ``timeout``) until it is gone.

        hivemind's ProgressTracker sends the withdrawal without waiting for it, so a process that exits right after
        (or shuts its DHT down) can leave a stale record that others keep counting until it expires.
        """
        self.shutdown_triggered.set()
        self.should_report_progress.set()
        self.global_state_updated.set()
        self.shutdown_complete.wait(timeout)
        withdrawal = self.dht.store(
            self.training_progress_key,
            subkey=self._local_public_key,
            value=None,
            expiration_time=get_dht_time() + self.metadata_expiration,
            return_future=True,
        )
        try:
            withdrawal.result(timeout=timeout)
        except Exception as e:
            logger.warning(f"Could not withdraw this peer's progress record from {self.training_progress_key}: {e!r}")

    def request_refresh(self) -> None:
        """Ask the background thread to read the records now (returns at once; nothing waits for the network)."""
        self.global_progress.next_fetch_time = get_dht_time()
        self.global_state_updated.set()

    def _parse_records(self, metadata: Any) -> list[PeerRecord]:
        local_id = self.dht.peer_id.to_bytes()
        now = get_dht_time()
        records: list[PeerRecord] = []
        if isinstance(metadata, dict):
            for subkey, entry in metadata.items():
                value = entry.value if isinstance(entry, ValueWithExpiration) else None
                if value is None:
                    continue  # a peer that left cleanly
                try:
                    parsed = CollabTrainingProgress.parse_obj(value)
                except Exception as e:  # a malformed record must not break the background thread
                    self._ignore_record(subkey, f"malformed ({type(e).__name__})")
                    continue
                if not math.isfinite(parsed.samples_per_second) or not math.isfinite(parsed.time):
                    self._ignore_record(subkey, "non-finite values")
                    continue
                if parsed.time > now + MAX_CLOCK_SKEW:
                    self._ignore_record(subkey, "stamped in the future")
                    continue
                if len(parsed.peer_id) > MAX_PEER_ID_BYTES:
                    self._ignore_record(subkey, f"an oversized peer id ({len(parsed.peer_id)} bytes)")
                    continue
                if parsed.peer_id == local_id:
                    continue  # our own record may be stale: the current local progress replaces it below
                records.append(
                    PeerRecord(
                        peer_id=parsed.peer_id,
                        step=parsed.epoch,
                        samples=parsed.samples_accumulated,
                        samples_per_second=parsed.samples_per_second,
                        time=parsed.time,
                        client_mode=parsed.client_mode,
                        fingerprint=parsed.fingerprint,
                    )
                )
        local = self.local_progress
        records.append(
            PeerRecord(
                peer_id=local_id,
                step=local.epoch,
                samples=local.samples_accumulated,
                samples_per_second=self.performance_ema.samples_per_second,
                time=now,
                client_mode=local.client_mode,
                fingerprint=self.fingerprint,
            )
        )
        return records

    def _ignore_record(self, subkey: Any, reason: str) -> None:
        """Skip a record: a warning the first time for this publisher and reason, DEBUG afterwards (no log flood)."""
        first = (subkey, reason) not in self._ignored_records
        if first and len(self._ignored_records) < 10_000:
            self._ignored_records.add((subkey, reason))
        logger.log(
            logging.WARNING if first else logging.DEBUG,
            f"Ignoring a progress record with {reason} under {self.training_progress_key} from {str(subkey)[:80]}",
        )

    def _parse_swarm_progress_data(self, metadata: Any) -> CollaborationView:
        now = get_dht_time()
        records = self._parse_records(metadata)
        local_step = self.local_progress.epoch
        global_step = max([local_step] + [peer.step for peer in records if not peer.client_mode])

        view = CollaborationView(
            epoch=global_step,
            samples_accumulated=0,
            target_batch_size=self.target_batch_size,
            num_peers=len(records),
            num_clients=sum(peer.client_mode for peer in records),
            eta_next_epoch=now,
            next_fetch_time=now,
            peers=tuple(records),
            fetched_at=now,
            local_peer_id=self.dht.peer_id.to_bytes(),
        )
        view.samples_accumulated = view.samples_at(global_step)

        total_rate = sum(peer.samples_per_second for peer in records) + self.performance_ema.eps
        remaining = max(0.0, self.target_batch_size - view.estimated_samples_at(global_step, now))
        time_to_next_step = remaining / total_rate
        view.eta_next_epoch = now + time_to_next_step

        peer_ids = frozenset(peer.peer_id for peer in records)
        if len(records) <= 1 or total_rate < 1e-9:  # alone, or nobody's speed is known yet: no ETA to plan by
            refresh = self.default_refresh_period
        else:
            expected_max_peers = max(
                len(records) + self.expected_drift_peers, len(records) * (1 + self.expected_drift_rate)
            )
            refresh = time_to_next_step * len(records) / expected_max_peers
        if peer_ids - self._known_peers:
            refresh = 0.0  # somebody joined: look again soon so that the newcomer is counted in the next step
        self._known_peers = peer_ids
        view.next_fetch_time = now + min(max(refresh, self.min_refresh_period), self.max_refresh_period)

        # the status line: INFO (with verbose) only when peers come or go or at a human pace (collab_core.reporting)
        throttle, meter = self.__dict__.setdefault("_status", (StatusThrottle(), RateMeter()))
        meter.observe(global_step * self.target_batch_size + view.samples_accumulated)  # the collaboration's progress
        rate = meter.rate()
        eta = eta_seconds(remaining, rate)
        shown = ProgressSnapshot(global_step, len(records), view.samples_accumulated, self.target_batch_size, rate, eta)
        reasons = throttle.reasons(StatusSnapshot(step=global_step, peers=len(records)))
        logger.log(self.status_loglevel if reasons else logging.DEBUG, status_line(self.prefix, shown, reasons))
        return view


__all__ = [
    "CollaborationTracker",
    "CollaborationView",
    "CollabTrainingProgress",
    "PeerRecord",
    "MAX_CLOCK_SKEW",
    "MAX_PEER_ID_BYTES",
]
