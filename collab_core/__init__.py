"""collab_core: collaborative training over hivemind, independent of any trainer.

Peers accumulate one large batch together (tracked in a hivemind DHT), average their gradients with an all-reduce
and take the same optimizer step. The Lightning and Accelerate integrations are thin layers over this package.

Importing it does not change hivemind: its hivemind workarounds are applied by :func:`start_dht` (and the
collaborative optimizers) through :func:`collab_core.hivemind_patches.apply`.
"""

from collab_core import hivemind_patches
from collab_core.dht import join_hint, start_dht
from collab_core.diloco import DiLoCoOptimizer
from collab_core.optimizer import (
    DEFAULT_AVERAGING_TIMEOUT,
    CollaborationState,
    CollaborativeAdaptiveOptimizer,
    CollaborativeOptimizer,
)
from collab_core.settings import CollaborativeConfigError, CollaborativeSettings

__version__ = "0.1.0"

__all__ = [
    "CollaborativeOptimizer",
    "CollaborativeAdaptiveOptimizer",
    "DiLoCoOptimizer",
    "CollaborationState",
    "CollaborativeSettings",
    "CollaborativeConfigError",
    "DEFAULT_AVERAGING_TIMEOUT",
    "start_dht",
    "join_hint",
    "hivemind_patches",
]
