"""The DHT side of a monitor: joining a run as a non-training peer and reading its records."""

from __future__ import annotations

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import SchemaValidator
from hivemind.optim.progress_tracker import TrainingProgressSchema
from hivemind.utils import ValueWithExpiration, get_dht_time

from collab_core.dht import start_dht
from collab_core.monitor.swarm import SwarmState, build_state, parse_progress_records
from collab_core.peer_metrics import metrics_key, metrics_validator, parse_metrics_records
from collab_core.progress import CollabProgressSchema
from collab_core.settings import CollaborativeSettings

__all__ = ["SwarmReader", "join_as_observer"]

#: metrics-only peers whose record is older than this are no longer listed (seconds; records live 60 s by default)
STALE_METRICS_SECONDS = 30.0


def join_as_observer(
    run_id: str,
    initial_peers: list[str],
    *,
    client_mode: bool = False,
    host_maddrs: list[str] | None = None,
    timeout: float = 15.0,
) -> hivemind.DHT:
    """Start a DHT node that joins run ``run_id`` through ``initial_peers`` and trains nothing.

    Raises:
        collab_core.CollaborativeConfigError: for a malformed run id or address (naming it and the fix).
        collab_core.dht.DHTStartupError: if no initial peer can be reached within ``timeout`` seconds.
    """
    explicit: dict = dict(run_id=run_id, initial_peers=list(initial_peers), client_mode=client_mode)
    if host_maddrs is not None:
        explicit["host_maddrs"] = list(host_maddrs)
    settings = CollaborativeSettings.resolve(**explicit)
    dht, _hint = start_dht(settings, print_hint=False, startup_timeout=timeout)  # applies collab_core's patches
    return dht


class SwarmReader:
    """Reads run ``run_id``'s progress and metrics records from ``dht`` and turns them into a :class:`SwarmState`.

    Args:
        dht: a running DHT joined to the run.
        run_id: the run's name.
    """

    def __init__(self, dht: hivemind.DHT, run_id: str) -> None:
        self.dht, self.run_id = dht, run_id
        # the validators a training peer registers, so that this node strips signatures and checks schemas too
        dht.add_validators(
            [
                SchemaValidator(CollabProgressSchema, prefix=run_id),
                SchemaValidator(TrainingProgressSchema, prefix=run_id),
                metrics_validator(run_id),
                RSASignatureValidator(),
            ]
        )

    def read(self, timeout: float) -> SwarmState:
        """One read of both keys (at most ``timeout`` seconds); a failed read gives a state with ``error`` set."""
        try:
            progress_future = self.dht.get(f"{self.run_id}_progress", latest=True, return_future=True)
            metrics_future = self.dht.get(metrics_key(self.run_id), latest=True, return_future=True)
            progress_value, metrics_value = progress_future.result(timeout), metrics_future.result(timeout)
        except Exception as e:
            return SwarmState(self.run_id, get_dht_time(), 0, None, 0, 0.0, None, None, error=f"{type(e).__name__}")
        now = get_dht_time()

        def unwrap(found: object) -> object:
            return found.value if isinstance(found, ValueWithExpiration) else None

        progress, skipped_progress = parse_progress_records(unwrap(progress_value), now)
        metrics, skipped_metrics = parse_metrics_records(unwrap(metrics_value), now)
        return build_state(
            self.run_id,
            progress,
            metrics,
            now,
            skipped_records=len(skipped_progress) + len(skipped_metrics),
            expiration=STALE_METRICS_SECONDS,
        )
