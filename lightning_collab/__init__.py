"""Lightning integration: ``Trainer(strategy="collaborative")`` for collaborative training over hivemind.

``import lightning_collab`` registers the strategy name ``"collaborative"`` in the registry of every installed
Lightning namespace (a strategy name is only known once the package that registers it is imported; LightningCLI's
``class_path: lightning_collab.CollaborativeStrategy`` imports it by itself):

* ``lightning_collab.CollaborativeStrategy`` for ``pytorch_lightning``;
* ``lightning_collab.LightningCollaborativeStrategy`` (also ``lightning_collab.lightning.CollaborativeStrategy``) for
  ``lightning.pytorch``;
* ``lightning_collab.fabric.CollaborativeFabricStrategy`` for Lightning Fabric (``lightning.fabric``), and
  ``lightning_collab.fabric_standalone.CollaborativeFabricStrategy`` for ``lightning_fabric``: ``"collaborative"`` in
  Fabric's strategy registry too, so ``Fabric(strategy="collaborative")`` works.

A namespace that is not installed is not imported; asking for its class raises ImportError with the fix.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from collab_core.metrics import METRIC_DESCRIPTIONS

_NAMESPACES = {
    # exported name: (our module, Lightning namespace, pip package)
    "CollaborativeStrategy": ("lightning_collab.pl", "pytorch_lightning", "pytorch-lightning"),
    "LightningCollaborativeStrategy": ("lightning_collab.lightning", "lightning.pytorch", "lightning"),
    "CollaborativeFabricStrategy": ("lightning_collab.fabric", "lightning.fabric", "lightning"),
}
#: Fabric's standalone package: registered when installed, its class is lightning_collab.fabric_standalone's
_STANDALONE_FABRIC = ("lightning_collab.fabric_standalone", "lightning_fabric", "lightning-fabric")


def _installed(namespace: str) -> bool:
    try:
        return importlib.util.find_spec(namespace) is not None
    except ModuleNotFoundError:  # the parent package (``lightning``) is missing
        return False


for _module, _namespace, _package in [*_NAMESPACES.values(), _STANDALONE_FABRIC]:
    if _installed(_namespace):
        importlib.import_module(_module)  # defines the class and registers "collaborative"


def __getattr__(name: str) -> Any:
    if name in _NAMESPACES:
        module, namespace, package = _NAMESPACES[name]
        if not _installed(namespace):
            raise ImportError(f"lightning_collab.{name} needs {namespace}: pip install {package}")
        return getattr(importlib.import_module(module), name.removeprefix("Lightning"))
    raise AttributeError(f"module 'lightning_collab' has no attribute {name!r}")


__all__ = [
    "CollaborativeFabricStrategy",
    "CollaborativeStrategy",
    "LightningCollaborativeStrategy",
    "METRIC_DESCRIPTIONS",
]
