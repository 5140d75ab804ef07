"""This peer's local side of an update: accumulated gradients, loss scaling, and ``opt.step()`` (no networking).

Shared by every averaging scheme: what differs between schemes is what is averaged and when the local optimizer
steps (:mod:`collab_core.schemes`), not how gradients are accumulated or how a non-finite update is skipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from collab_core.accumulator import GradientAccumulator
from collab_core.amp import LossScaleKeeper
from collab_core.log import get_logger

logger = get_logger(__name__)


def all_finite(tensors: Iterable[torch.Tensor | None]) -> bool:
    """Whether every given tensor (``None`` counts as finite) holds only finite values."""
    return all(tensor is None or bool(torch.isfinite(tensor).all()) for tensor in tensors)


class LocalUpdate:
    """Accumulates this peer's micro-batches and applies updates to its optimizer and scheduler.

    Args:
        opt: the wrapped optimizer.
        scheduler: stepped exactly once per collaborative step (skipped or not), or None.
        reuse_grad_buffers: accumulate in ``param.grad`` (see :class:`~collab_core.accumulator.GradientAccumulator`).
        accumulate_grads_on: device of the separate accumulators.
        grad_scaler: the fp16 ``torch.amp.GradScaler``, or None.
        prefix: the run's name, for log lines.
        keep_gradients: accumulate gradients between collaborative steps (False: count samples only, for schemes
            that consume each micro-batch's gradients themselves, see
            :class:`~collab_core.accumulator.GradientAccumulator`).
    """

    def __init__(
        self,
        opt: torch.optim.Optimizer,
        scheduler: Any | None,
        *,
        reuse_grad_buffers: bool,
        accumulate_grads_on: torch.device | None,
        grad_scaler: Any | None,
        prefix: str,
        keep_gradients: bool = True,
    ):
        self.opt, self.scheduler, self.prefix = opt, scheduler, prefix
        self.params = [param for group in opt.param_groups for param in group["params"]]
        self.accumulator = GradientAccumulator(
            self.params,
            reuse_grad_buffers=reuse_grad_buffers,
            accumulate_grads_on=accumulate_grads_on,
            keep_gradients=keep_gradients,
        )
        self.loss_scale = LossScaleKeeper(grad_scaler) if grad_scaler is not None else None
        self.overflow_steps = 0  # collaborative steps skipped because some peer's fp16 gradients had inf/NaN
        self.nonfinite_steps = 0  # ... because the averaged gradient had inf/NaN without an fp16 overflow
        self.last_step_skipped = False

    @property
    def samples(self) -> int:
        """Samples accumulated toward the next collaborative step."""
        return self.accumulator.samples

    @property
    def scaling_loss(self) -> bool:
        """Whether gradients are fp16-scaled (and must be unscaled once per collaborative step)."""
        return self.loss_scale is not None and self.loss_scale.enabled

    def add(self, batch_size: int) -> None:
        """Accumulate the gradients of the last backward pass."""
        self.accumulator.add(batch_size)

    def reset(self) -> None:
        """Forget the accumulated gradients (after a step or a download)."""
        self.accumulator.reset()

    @torch.no_grad()
    def discard_current_gradients(self) -> None:
        """Zero ``param.grad`` of the micro-batch in hand (it was computed for parameters about to be replaced)."""
        for param in self.params:
            if param.grad is not None:
                param.grad.zero_()

    def grad_buffers(self) -> list[torch.Tensor]:
        """``param.grad`` of every parameter, created as zeros where missing."""
        for param in self.params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        return [param.grad for param in self.params]

    @torch.no_grad()
    def write_mean(self, out: Sequence[torch.Tensor]) -> bool:
        """Write this peer's mean gradient into ``out`` (unscaled with fp16); True if it overflowed (then zeros)."""
        self.accumulator.write_mean(out)
        if self.scaling_loss:
            return not self.loss_scale.unscale_(out)  # type: ignore[union-attr]
        return False

    def step_alone(self, step: int) -> None:
        """Apply this peer's own mean gradient as collaborative step ``step``."""
        gradients = self.grad_buffers()
        overflow = self.write_mean(gradients)
        self.apply(step, overflow=overflow)

    def apply(self, step: int, overflow: bool = False) -> None:
        """``opt.step()`` with the gradients in ``param.grad``, unless they contain inf/NaN; then the scheduler.

        With fp16 loss scaling an overflow flagged by any peer skips the step and backs the scale off. Any other
        inf/NaN in the (averaged) gradient also skips the step, so that one faulty or malicious peer cannot make
        every replica's parameters non-finite. Every member of a round sees the same averaged values, so all of
        them skip together and stay identical.
        """
        if self.scaling_loss:
            self.loss_scale.update(found_inf=overflow)  # type: ignore[union-attr]
        nonfinite = not overflow and not all_finite(param.grad for param in self.params)
        self.last_step_skipped = overflow or nonfinite
        if overflow:
            self.overflow_steps += 1
            logger.warning(f"{self.prefix}: inf/NaN in the fp16 gradients of step {step}; skipping it")
        elif nonfinite:
            self.nonfinite_steps += 1
            logger.warning(
                f"{self.prefix}: the averaged gradient of step {step} contains inf/NaN (a peer sent non-finite "
                "gradients); skipping this update on every peer of the round"
            )
        else:
            self.opt.step()
        # the scheduler follows the step count, skipped or not, so that every peer's learning rate stays the same
        if self.scheduler is not None:
            self.scheduler.step()


__all__ = ["LocalUpdate", "all_finite"]
