"""``CollaborativeStrategy`` for ``lightning.pytorch`` (package ``lightning``), registered as ``"collaborative"``."""

from __future__ import annotations

from lightning_collab.multi_device import MultiDeviceCollaborativeMixin
from lightning_collab.strategy import (
    STRATEGY_DESCRIPTION,
    STRATEGY_NAME,
    CollaborativeStrategyMixin,
    LightningNamespace,
)

NAMESPACE = LightningNamespace.load("lightning.pytorch")


class CollaborativeStrategy(CollaborativeStrategyMixin, NAMESPACE.SingleDeviceStrategy):  # type: ignore[misc,name-defined]
    """Collaborative training for ``lightning.pytorch.Trainer``: ``Trainer(strategy="collaborative")``.

    This peer trains on the Trainer's device; with ``devices=N`` it is N local processes (DDP inside the machine,
    see :class:`CollaborativeMultiDeviceStrategy`) that act as one peer. All peers of the run accumulate
    ``target_batch_size`` samples together, average their gradients and take the same optimizer step (see
    ``collab_core.CollaborativeOptimizer``). The arguments are documented on ``__init__``; every one of them can also
    come from a ``COLLAB_*`` environment variable.

    Attributes:
        settings: the resolved ``collab_core.CollaborativeSettings``.
        collaborative_optimizer: the ``CollaborativeOptimizer`` while/after fitting, else None.
        join_hint: the environment another peer needs to join this run (printed when fitting starts).
    """

    _lightning = NAMESPACE


class CollaborativeMultiDeviceStrategy(MultiDeviceCollaborativeMixin, NAMESPACE.DDPStrategy):  # type: ignore[misc,name-defined]
    """What :class:`CollaborativeStrategy` becomes with ``Trainer(devices=N)``, N > 1: one peer of N local processes.

    Local rank 0 runs the DHT node and the collaborative optimizer and reports the samples of all processes; the
    others follow it (see :mod:`lightning_collab.multi_device`). Not constructed directly.
    """

    _lightning = NAMESPACE


CollaborativeStrategy._multi_device_class = CollaborativeMultiDeviceStrategy

if STRATEGY_NAME not in NAMESPACE.StrategyRegistry:
    NAMESPACE.StrategyRegistry.register(STRATEGY_NAME, CollaborativeStrategy, description=STRATEGY_DESCRIPTION)

__all__ = ["CollaborativeMultiDeviceStrategy", "CollaborativeStrategy"]
