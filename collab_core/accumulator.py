"""Local gradient accumulation between collaborative steps (no networking here)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class GradientAccumulator:
    """Sums this peer's gradients over the micro-batches of one collaborative step.

    The result is the *sample-weighted* mean gradient of this peer: each micro-batch's gradient (of a loss averaged
    over that micro-batch) is weighted by its batch size, so peers and micro-batches of different sizes combine into
    exactly the gradient of one large batch. (hivemind's GradientAverager weights micro-batches relative to the first
    one and divides by their count, which is exact only when every micro-batch has the same size.)

    Args:
        parameters: the trainable parameters.
        reuse_grad_buffers: accumulate in ``param.grad`` itself (autograd sums the micro-batches; no extra memory).
            Micro-batches are then weighted equally, which is exact when they all have the same size.
        accumulate_grads_on: device for the separate accumulators (e.g. ``cpu`` to save accelerator memory);
            default: the parameters' device. Not allowed together with ``reuse_grad_buffers``.
        keep_gradients: False for a scheme that consumes every micro-batch's gradients itself (DiLoCo's inner
            steps): then only the samples are counted, no accumulator is allocated and ``param.grad`` is left alone.
    """

    def __init__(
        self,
        parameters: Sequence[torch.nn.Parameter],
        *,
        reuse_grad_buffers: bool,
        accumulate_grads_on: torch.device | None,
        keep_gradients: bool = True,
    ):
        self.parameters = tuple(parameters)
        self.reuse_grad_buffers = reuse_grad_buffers
        self.keep_gradients = keep_gradients
        self.samples = 0
        self.micro_batches = 0
        self._accumulators: tuple[torch.Tensor, ...] = ()
        if keep_gradients and not reuse_grad_buffers:
            self._accumulators = tuple(torch.zeros_like(p, device=accumulate_grads_on) for p in self.parameters)
        self._grad_buffers: tuple[torch.Tensor | None, ...] = ()

    @torch.no_grad()
    def add(self, batch_size: int) -> None:
        """Add the gradients of the last backward pass (``batch_size`` samples), then clear ``param.grad``.

        Raises:
            RuntimeError: with ``reuse_grad_buffers``, if the gradient buffers were wiped since the last call
                (``zero_grad`` between micro-batches would drop samples that are already counted).
        """
        if not self.keep_gradients:
            pass  # the scheme consumed the gradients (e.g. an inner optimizer step): count the samples only
        elif self.reuse_grad_buffers:
            self._check_grad_buffers_kept()
            self._grad_buffers = tuple(p.grad for p in self.parameters)
        else:
            for param, accumulator in zip(self.parameters, self._accumulators, strict=True):
                if param.grad is not None:
                    accumulator.add_(param.grad.to(accumulator.device, non_blocking=True), alpha=batch_size)
                    param.grad.zero_()
        self.samples += batch_size
        self.micro_batches += 1

    def _check_grad_buffers_kept(self) -> None:
        if self.micro_batches == 0:
            return
        for param, previous in zip(self.parameters, self._grad_buffers, strict=True):
            if previous is not None and param.grad is not previous:
                raise RuntimeError(
                    "reuse_grad_buffers=True accumulates in param.grad, but the gradients were reset since the last "
                    "step() (zero_grad or assigning .grad): the samples already counted would be lost. Do not call "
                    "zero_grad between steps with reuse_grad_buffers=True, or set reuse_grad_buffers=False."
                )

    @torch.no_grad()
    def write_mean(self, out: Sequence[torch.Tensor]) -> None:
        """Write this peer's mean gradient (sum / samples, or / micro-batches when reusing .grad) into ``out``."""
        if self.reuse_grad_buffers:
            scale = 1.0 / max(self.micro_batches, 1)
            for param, buffer in zip(self.parameters, out, strict=True):
                if param.grad is None:
                    buffer.zero_()
                else:
                    buffer.copy_(param.grad, non_blocking=True).mul_(scale)
        else:
            scale = 1.0 / max(self.samples, 1)
            for accumulator, buffer in zip(self._accumulators, out, strict=True):
                buffer.copy_(accumulator, non_blocking=True).mul_(scale)

    @torch.no_grad()
    def reset(self) -> None:
        """Forget the accumulated gradients (after a collaborative step or a state download)."""
        self.samples = 0
        self.micro_batches = 0
        self._grad_buffers = ()
        for accumulator in self._accumulators:
            accumulator.zero_()
        for param in self.parameters:
            if param.grad is not None:
                param.grad.zero_()


__all__ = ["GradientAccumulator"]
