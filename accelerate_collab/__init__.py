"""Hugging Face Accelerate integration: an ``accelerate launch`` script joins a collaborative training run.

.. code-block:: python

    accelerator = Accelerator(gradient_accumulation_steps=2)
    collab = CollaborativeConfig.from_yaml("collab.yaml")  # + COLLAB_* environment overrides
    optimizer, scheduler = prepare_collaborative(accelerator, optimizer, scheduler, config=collab)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

A thin adapter over :mod:`collab_core`: the collaborative logic (progress tracking, averaging, state downloads,
scheduler) is the core's; this package maps Accelerate's gradient accumulation, local processes, mixed precision,
checkpoints and trackers onto it. See ``docs/accelerate.md``.
"""

from accelerate_collab.config import CollaborativeConfig, CollaborativeConfigError
from accelerate_collab.metrics import METRIC_NAMES
from accelerate_collab.optimizer import CollaborativeAcceleratedOptimizer
from accelerate_collab.prepare import prepare_collaborative
from accelerate_collab.scheduler import CollaborativeAcceleratedScheduler

__all__ = [
    "CollaborativeConfig",
    "CollaborativeConfigError",
    "prepare_collaborative",
    "CollaborativeAcceleratedOptimizer",
    "CollaborativeAcceleratedScheduler",
    "METRIC_NAMES",
]
