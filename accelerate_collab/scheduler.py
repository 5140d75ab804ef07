"""The learning-rate scheduler handed back to the training loop: Accelerate's wrapper, stepped by the collaboration.

Accelerate's ``AcceleratedScheduler`` steps the scheduler after every real optimizer step, ``num_processes`` times
unless ``split_batches``. A collaborative run must advance it exactly once per *collaborative* step, on every peer,
and restore it on a state download; the collaborative optimizer already does both. So ``scheduler.step()`` in the
training loop does nothing here, and the wrapper is marked prepared so that ``accelerator.prepare`` keeps it as it
is. It also counts as a ``torch.optim.lr_scheduler.LRScheduler`` (without that, ``accelerator.prepare`` would pass it
through without registering it for ``save_state``/``load_state``); attributes it does not define, such as
``last_epoch``, ``base_lrs`` or ``optimizer``, are the wrapped scheduler's.
"""

from __future__ import annotations

from typing import Any

from accelerate.scheduler import AcceleratedScheduler
from torch.optim.lr_scheduler import LRScheduler


class CollaborativeAcceleratedScheduler(AcceleratedScheduler, LRScheduler):
    """A scheduler whose ``step()`` is a no-op: the collaborative optimizer steps the wrapped scheduler.

    Args:
        scheduler: the user's learning-rate scheduler (built on the user's optimizer).
        optimizer: the collaborative optimizer returned by ``prepare_collaborative``.
    """

    def __init__(self, scheduler: Any, optimizer: Any) -> None:
        # AcceleratedScheduler.__init__ only (not LRScheduler.__init__, which would step the wrapped scheduler)
        AcceleratedScheduler.__init__(self, scheduler, optimizer, step_with_optimizer=True, split_batches=True)
        self._is_accelerate_prepared = True

    def __getattr__(self, name: str) -> Any:
        # only called for attributes not found on the wrapper: those of the wrapped scheduler (e.g. last_epoch)
        if name == "scheduler":
            raise AttributeError(name)
        return getattr(self.scheduler, name)

    def step(self, *args: Any, **kwargs: Any) -> None:
        """Do nothing: the scheduler advances once per collaborative step, inside ``optimizer.step()``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.scheduler).__name__}, last_epoch={self.scheduler.last_epoch})"


__all__ = ["CollaborativeAcceleratedScheduler"]
