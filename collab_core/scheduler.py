"""The scheduler stand-in every integration hands back to its training loop, and the check of the user's scheduler.

A collaborative run advances the user's learning-rate scheduler exactly once per *collaborative* step, on every peer,
inside ``optimizer.step()`` (:class:`collab_core.Collaboration` does it, and restores the scheduler on a state
download). The trainers all call ``scheduler.step()`` themselves (Lightning after every optimizer step or epoch,
Accelerate after every real optimizer step), so what they hold must be a stand-in whose ``step()`` does nothing and
which is otherwise the user's scheduler. Lightning's strategy, Lightning Fabric and the Accelerate wrapper use
:class:`SchedulerDrivenByCollaboration` (Accelerate mixes it into its ``AcceleratedScheduler`` subclass) and
:func:`check_collaborative_scheduler`, so the rule and the error messages live here once.
"""

from __future__ import annotations

from typing import Any

import torch


def check_collaborative_scheduler(
    scheduler: Any, optimizer: Any | None = None, *, steps_on_metric: bool = False
) -> None:
    """Refuse schedulers that cannot advance identically on every peer.

    Args:
        scheduler: the user's learning-rate scheduler, or None (nothing to check).
        optimizer: if given, the optimizer the scheduler must be built on.
        steps_on_metric: the trainer says this scheduler steps on a monitored metric (Lightning's
            ``reduce_on_plateau``), whatever its class.

    Raises:
        ValueError: for ``ReduceLROnPlateau`` (it steps on a locally monitored metric, so peers would change their
            learning rates at different times), or a scheduler built on another optimizer than ``optimizer``.
    """
    if scheduler is None:
        return
    if steps_on_metric or isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise ValueError(
            "ReduceLROnPlateau is not supported in a collaboration: it steps on a locally monitored metric, so "
            "peers would change their learning rates at different times. Use a scheduler driven by the step count "
            "(e.g. LambdaLR, CosineAnnealingLR, OneCycleLR); it advances once per collaborative step."
        )
    if optimizer is not None and getattr(scheduler, "optimizer", None) is not optimizer:
        raise ValueError(
            "scheduler is not built on this optimizer: create it as e.g. LambdaLR(optimizer, ...) with the optimizer "
            "you pass alongside it."
        )


class SchedulerDrivenByCollaboration:
    """Stands in for the user's scheduler in a trainer's loop: ``step()`` does nothing, the rest is the real one's.

    The collaboration steps the wrapped scheduler once per collaborative step. ``state_dict``/``load_state_dict``
    (checkpoints), ``get_last_lr``, ``last_epoch``, ``base_lrs`` and ``optimizer`` (e.g. Lightning's
    ``LearningRateMonitor``) are the wrapped scheduler's.

    Args:
        scheduler: the user's learning-rate scheduler, the one given to the collaboration.
    """

    scheduler: Any

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def step(self, *args: Any, **kwargs: Any) -> None:
        """Do nothing: the scheduler advances once per collaborative step, inside ``optimizer.step()``."""

    def state_dict(self) -> dict[str, Any]:
        """The wrapped scheduler's state dict."""
        return self.scheduler.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the wrapped scheduler's state dict."""
        self.scheduler.load_state_dict(state_dict)

    def __getattr__(self, name: str) -> Any:
        # only called for attributes not found on the stand-in: those of the wrapped scheduler (e.g. last_epoch)
        if name == "scheduler":  # not set yet (e.g. while unpickling): do not recurse
            raise AttributeError(name)
        return getattr(self.scheduler, name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.scheduler).__name__}, last_epoch={self.scheduler.last_epoch})"


__all__ = ["SchedulerDrivenByCollaboration", "check_collaborative_scheduler"]
