"""The learning-rate scheduler handed back to the training loop: Accelerate's wrapper, stepped by the collaboration.

Accelerate's ``AcceleratedScheduler`` steps the scheduler after every real optimizer step, ``num_processes`` times
unless ``split_batches``. A collaborative run must advance it exactly once per *collaborative* step, on every peer,
and restore it on a state download; the collaborative optimizer already does both. So this is the core's
:class:`collab_core.scheduler.SchedulerDrivenByCollaboration` (``scheduler.step()`` in the training loop does
nothing; the rest is the wrapped scheduler's), mixed into Accelerate's wrapper and marked prepared so that
``accelerator.prepare`` keeps it as it is. It also counts as a ``torch.optim.lr_scheduler.LRScheduler`` (without
that, ``accelerator.prepare`` would pass it through without registering it for ``save_state``/``load_state``).
"""

from __future__ import annotations

from typing import Any

from accelerate.scheduler import AcceleratedScheduler
from torch.optim.lr_scheduler import LRScheduler

from collab_core.scheduler import SchedulerDrivenByCollaboration


class CollaborativeAcceleratedScheduler(SchedulerDrivenByCollaboration, AcceleratedScheduler, LRScheduler):
    """A scheduler whose ``step()`` is a no-op: the collaborative optimizer steps the wrapped scheduler.

    Args:
        scheduler: the user's learning-rate scheduler (built on the user's optimizer).
        optimizer: the collaborative optimizer returned by ``prepare_collaborative``.
    """

    def __init__(self, scheduler: Any, optimizer: Any) -> None:
        # AcceleratedScheduler.__init__ only (not LRScheduler.__init__, which would step the wrapped scheduler)
        AcceleratedScheduler.__init__(self, scheduler, optimizer, step_with_optimizer=True, split_batches=True)
        self._is_accelerate_prepared = True


__all__ = ["CollaborativeAcceleratedScheduler"]
