"""``CollaborativeFabricStrategy`` for ``lightning.fabric`` (package ``lightning``), registered as ``"collaborative"``:
``Fabric(strategy="collaborative")`` once ``lightning_collab`` is imported."""

from __future__ import annotations

from lightning_collab.fabric_strategy import CollaborativeFabricStrategyMixin, FabricNamespace

NAMESPACE = FabricNamespace.load("lightning.fabric")


class CollaborativeFabricStrategy(CollaborativeFabricStrategyMixin, NAMESPACE.SingleDeviceStrategy):  # type: ignore[misc,name-defined]
    """Collaborative training for ``lightning.fabric.Fabric``: ``Fabric(strategy="collaborative")``.

    This peer trains on one device; all peers of the run accumulate ``target_batch_size`` samples together, average
    their gradients (or, with ``algorithm="diloco"``, their pseudo-gradients) and take the same optimizer step. The
    arguments are documented on ``__init__``; every setting can also come from a ``COLLAB_*`` environment variable.

    Attributes:
        settings: the resolved ``collab_core.CollaborativeSettings``.
        collaborative_optimizer: the collaborative optimizer after ``fabric.setup``, else None.
        join_hint: the environment another peer needs to join this run (printed at ``fabric.setup``).
    """

    _fabric = NAMESPACE


NAMESPACE.register(CollaborativeFabricStrategy)

__all__ = ["CollaborativeFabricStrategy"]
