"""Publishing this peer's metrics record (:mod:`collab_core.peer_metrics`) for monitors such as ``collab monitor``.

The engine (:class:`collab_core.collaboration.Collaboration`) owns one :class:`MetricsPublisher`, so the core
optimizer, the Lightning strategy and the Accelerate wrapper all publish it without code of their own; they only
hand over the loss (``CollaborativeOptimizer.record_loss``). Publishing never waits for the network: a store is
sent at most every ``interval`` seconds (and at once when the step changes), and its result is not awaited.
"""

from __future__ import annotations

import ipaddress
import math
import time
from typing import Any

from hivemind.dht import DHT
from hivemind.utils import get_dht_time

from collab_core.log import get_logger
from collab_core.peer_metrics import MAX_MADDRS, metrics_key, metrics_validator
from collab_core.reporting import RateMeter

logger = get_logger(__name__)

__all__ = ["MetricsPublisher", "PUBLISH_INTERVAL", "loss_value", "reachable_maddrs"]

#: seconds between two metrics records of one peer (a step change publishes at once)
PUBLISH_INTERVAL = 1.0


def loss_value(loss: Any) -> float | None:
    """A loss as a float: a number, a 0-d tensor, or a dict with a ``"loss"`` entry (Lightning's training_step
    output); None for anything else, or a non-finite value."""
    if isinstance(loss, dict):
        loss = loss.get("loss")
    if loss is None or isinstance(loss, bool):
        return None
    try:
        if hasattr(loss, "detach"):
            if loss.numel() != 1:
                return None
            loss = loss.detach().float().item()
        value = float(loss)
    except (TypeError, ValueError, RuntimeError):
        return None
    return value if math.isfinite(value) else None


def reachable_maddrs(dht: DHT) -> list[str]:
    """The addresses other peers can dial this peer at (no unspecified ``0.0.0.0``/``::``), at most ``MAX_MADDRS``."""
    if dht.client_mode:
        return []
    try:
        maddrs = [str(maddr) for maddr in dht.get_visible_maddrs()]
    except Exception:  # hivemind raises ValueError when the daemon reports no addresses
        return []
    visible = []
    for maddr in maddrs:
        parts = maddr.split("/")
        host = parts[2] if len(parts) > 2 and parts[1] in ("ip4", "ip6") else None
        try:
            if host is not None and ipaddress.ip_address(host).is_unspecified:
                continue
        except ValueError:
            pass
        visible.append(maddr[:256])
    return visible[:MAX_MADDRS]


class MetricsPublisher:
    """Publishes one peer's signed metrics record, throttled, without blocking the training loop.

    Args:
        dht: the running DHT.
        run_id: the run's name (the key is ``{run_id}_metrics``).
        public_key: this peer's signing public key (the progress tracker's; the DHT signs with its private key).
        target_batch_size: samples per collaborative step.
        client_mode: whether this peer accepts no incoming connections.
        expiration: seconds a record lives unless refreshed.
        version: the collab-training version published.
        interval: seconds between records (a step change publishes at once).
    """

    def __init__(
        self,
        dht: DHT,
        run_id: str,
        public_key: bytes,
        *,
        target_batch_size: int,
        client_mode: bool,
        expiration: float,
        version: str,
        interval: float = PUBLISH_INTERVAL,
    ) -> None:
        self.dht, self.key, self.public_key = dht, metrics_key(run_id), public_key
        self.target_batch_size, self.client_mode = int(target_batch_size), bool(client_mode)
        self.expiration, self.version, self.interval = float(expiration), version, float(interval)
        self.peer_id = dht.peer_id.to_bytes()
        self.maddrs = reachable_maddrs(dht)
        self.samples_contributed = 0
        self.loss: float | None = None
        self.step = 0
        self.meter = RateMeter()
        self._published_at = -math.inf
        self._published_step = -1
        self._closed = False
        dht.add_validators([metrics_validator(run_id)])

    def record_loss(self, loss: Any) -> None:
        """Remember the latest training loss (see :func:`loss_value` for what is accepted; others are ignored)."""
        value = loss_value(loss)
        if value is not None:
            self.loss = value

    def count(self, samples: int) -> None:
        """Count ``samples`` more samples this peer contributed (no network)."""
        self.samples_contributed += int(samples)
        self.meter.observe(self.samples_contributed)

    def at_step(self, step: int) -> None:
        """This peer is at collaborative ``step``: publish if a record is due (at once when the step changed)."""
        self.step = int(step)
        self.maybe_publish()

    def record(self) -> dict[str, Any]:
        """The record as published (``PeerMetricsRecord`` fields)."""
        rate = self.meter.rate()
        return {
            "peer_id": self.peer_id,
            "step": max(0, self.step),
            "loss": self.loss,
            "samples_per_second": float(rate) if rate is not None else 0.0,
            "samples_contributed": self.samples_contributed,
            "target_batch_size": self.target_batch_size,
            "client_mode": self.client_mode,
            "time": float(get_dht_time()),
            "version": self.version[:32],
            "maddrs": self.maddrs,
        }

    def maybe_publish(self, force: bool = False) -> None:
        """Send a record if ``interval`` seconds passed or the step changed (or ``force``); never waits."""
        now = time.monotonic()
        due = force or self.step != self._published_step or now - self._published_at >= self.interval
        if self._closed or not due:
            return
        self._published_at, self._published_step = now, self.step
        try:
            self.dht.store(
                self.key,
                subkey=self.public_key,
                value=self.record(),
                expiration_time=get_dht_time() + self.expiration,
                return_future=True,
            )
        except Exception as e:  # monitoring must never break training
            logger.debug(f"could not publish the metrics record: {e!r}")

    def withdraw(self, timeout: float) -> None:
        """Withdraw this peer's record (a monitor then stops listing it at once); waits at most ``timeout``."""
        if self._closed:
            return
        self._closed = True
        try:
            self.dht.store(
                self.key,
                subkey=self.public_key,
                value=None,
                expiration_time=get_dht_time() + self.expiration,
                return_future=True,
            ).result(timeout=timeout)
        except Exception as e:
            logger.debug(f"could not withdraw the metrics record: {e!r}")
