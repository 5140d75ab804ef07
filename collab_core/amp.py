"""fp16 loss scaling across a collaborative step (no networking here).

With fp16 mixed precision, ``loss.backward()`` produces gradients multiplied by the loss scale of a
``torch.amp.GradScaler``. A regular training loop unscales, checks for inf/NaN and adjusts the scale after *every*
optimizer step. In a collaboration one update spans many micro-batches (and peers), so :class:`LossScaleKeeper`
does all of that once per collaborative step instead:

* between collaborative steps the scale never changes, so scaled micro-batch gradients can be summed as they are;
* at the step, this peer's mean gradient is divided by the scale once and checked; a non-finite result is replaced
  by zeros (it must not travel to other peers) and reported as an overflow;
* after the step, the scale grows or backs off by the scaler's own factors and interval, and the new value is set
  with the public ``GradScaler.update(new_scale)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class LossScaleKeeper:
    """Unscales accumulated gradients and updates a ``torch.amp.GradScaler`` once per collaborative step.

    Args:
        scaler: the scaler whose ``scale(loss)`` produced the gradients (Lightning's or Accelerate's, or your own).
    """

    def __init__(self, scaler: Any):
        for method in ("get_scale", "update", "is_enabled", "get_growth_factor", "get_backoff_factor"):
            if not callable(getattr(scaler, method, None)):
                raise ValueError(
                    f"grad_scaler must be a torch.amp.GradScaler (it has no {method}()); got {type(scaler).__name__}"
                )
        self.scaler = scaler
        self.steps_since_overflow = 0  # the scaler's growth tracker, kept here (GradScaler's own is private)

    @property
    def enabled(self) -> bool:
        return bool(self.scaler.is_enabled())

    @torch.no_grad()
    def unscale_(self, gradients: Sequence[torch.Tensor]) -> bool:
        """Divide ``gradients`` by the current scale in place; True if all are finite (else they are zeroed)."""
        inverse_scale = 1.0 / float(self.scaler.get_scale())
        finite = True
        for gradient in gradients:
            gradient.mul_(inverse_scale)
            finite = finite and bool(torch.isfinite(gradient).all())
        if not finite:
            for gradient in gradients:
                gradient.zero_()
        return finite

    def update(self, found_inf: bool) -> None:
        """Back off after an overflow anywhere in the collaboration; grow after ``growth_interval`` clean steps."""
        scale = float(self.scaler.get_scale())
        if found_inf:
            self.steps_since_overflow = 0
            new_scale = scale * float(self.scaler.get_backoff_factor())
        else:
            self.steps_since_overflow += 1
            new_scale = scale
            if self.steps_since_overflow >= int(self.scaler.get_growth_interval()):
                self.steps_since_overflow = 0
                new_scale = scale * float(self.scaler.get_growth_factor())
        if new_scale == scale:
            return
        try:
            self.scaler.update(new_scale)
        except AssertionError as e:  # torch asserts when scale() was never called on this scaler
            raise RuntimeError(
                "grad_scaler was given to the collaborative optimizer but never scaled a loss: compute gradients with "
                "grad_scaler.scale(loss).backward(), or do not pass grad_scaler"
            ) from e


__all__ = ["LossScaleKeeper"]
