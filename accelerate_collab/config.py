"""The settings of a peer that trains with Accelerate: the core settings schema, loaded from ``collab.yaml``.

Accelerate has no plugin mechanism (an unknown key in its own config file is an error), so collaborative settings
live in a separate YAML file whose keys are exactly the fields of :class:`collab_core.CollaborativeSettings`, with
``COLLAB_*`` environment variables taking precedence (``accelerate launch`` passes the environment to every
process). Validation and error messages are the core's: an unknown key, a value of the wrong type or a malformed
multiaddr raise :class:`collab_core.CollaborativeConfigError` naming the key or variable and the fix.
"""

from __future__ import annotations

from collab_core import CollaborativeConfigError, CollaborativeSettings


class CollaborativeConfig(CollaborativeSettings):
    """Collaborative settings of one peer (the core schema; nothing is added or renamed).

    Load it with ``CollaborativeConfig.from_yaml("collab.yaml")`` (``COLLAB_*`` variables override the file),
    ``CollaborativeConfig.from_env()``, or ``CollaborativeConfig.resolve(yaml_path=..., **explicit)``.

    In the Accelerate integration ``batch_size`` means the samples of one micro-batch on one process, i.e. of one
    ``optimizer.step()`` call of one process; leave it unset to read it from the dataloader prepared by
    ``accelerator.prepare``.
    """


__all__ = ["CollaborativeConfig", "CollaborativeConfigError"]
