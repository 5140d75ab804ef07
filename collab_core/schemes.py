"""Averaging schemes: what a round averages and how its result is applied (no networking here).

The engine (:class:`collab_core.collaboration.Collaboration`) runs the same protocol for every scheme: plan, write the
buffers, average them in one round, then apply or discard. A scheme supplies the four steps in between:

* :meth:`AveragingScheme.make_buffers`: the host-memory tensors the averager averages (created once);
* :meth:`AveragingScheme.write`: fill them with this peer's part before a round;
* :meth:`AveragingScheme.apply`: use the averaged values after a round that completed;
* :meth:`AveragingScheme.discard`: undo whatever :meth:`write` changed locally after a round that did not;

plus :meth:`AveragingScheme.step_alone` (nobody else is at this step), the state a joining peer downloads
(:meth:`capture` / :meth:`restore`), what one ``step()`` call does with its micro-batch
(:meth:`add_micro_batch`: accumulate it, or, in DiLoCo, take an inner optimizer step), the state's initial
fingerprint and the scheme's own part of a checkpoint (:meth:`state_dict` / :meth:`load_state_dict`). The engine calls
all of them from the training thread, with the state lock held except for :meth:`add_micro_batch`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch

from collab_core.fingerprint import tensors_fingerprint
from collab_core.local_update import LocalUpdate
from collab_core.state import capture_state, restore_state


class AveragingScheme(ABC):
    """What is averaged and how it is applied (see the module docstring).

    Args:
        local: this peer's accumulated gradients, optimizer and scheduler.
    """

    #: whether :meth:`add_micro_batch` changes the parameters (an inner step): then every ``step()`` call does
    steps_locally = False

    def __init__(self, local: LocalUpdate):
        self.local = local

    def add_micro_batch(self, batch_size: int) -> None:
        """One ``step()`` call's micro-batch (its gradients in ``param.grad``): accumulate it toward the next round."""
        self.local.add(batch_size)

    def initial_fingerprint(self) -> str:
        """The fingerprint of this peer's state before any collaborative step (from the parameters' bytes)."""
        return tensors_fingerprint(self.local.params)

    def state_dict(self) -> dict[str, Any]:
        """The scheme's own state for a checkpoint, beyond the optimizer's and scheduler's (none by default)."""
        return {}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:  # noqa: B027 - optional, like discard()
        """Restore what :meth:`state_dict` returned (None: the checkpoint has none, e.g. a plain optimizer's)."""

    @abstractmethod
    def make_buffers(self) -> list[torch.Tensor]:
        """The tensors every round averages (host memory, created once; every peer must create the same shapes)."""

    @abstractmethod
    def write(self, buffers: Sequence[torch.Tensor], step: int) -> None:
        """Put this peer's part of ``step`` into ``buffers`` before the round."""

    @abstractmethod
    def apply(self, buffers: Sequence[torch.Tensor], step: int) -> None:
        """Apply the averaged ``buffers`` as collaborative step ``step`` (the round completed)."""

    def discard(self) -> None:  # noqa: B027 - an optional hook: schemes whose write() changes nothing keep it
        """The round did not complete: undo what :meth:`write` changed locally (nothing by default)."""

    def step_alone(self, step: int) -> None:
        """Nobody else is at this step with this state: apply this peer's own mean gradient."""
        self.local.step_alone(step)

    def capture(self, step: int) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """The state a joining peer downloads: parameters, optimizer and scheduler state, and ``step``."""
        return capture_state(self.local.opt, self.local.scheduler, step)

    def restore(self, metadata: dict[str, Any], tensors: Sequence[torch.Tensor]) -> int:
        """Load a state made by :meth:`capture` on another peer; returns its step."""
        theirs = metadata.get("algorithm") if isinstance(metadata, dict) else None
        if theirs is not None:
            raise ValueError(
                f"the serving peer runs algorithm {theirs!r}, this peer {type(self).__name__}: all peers of a run "
                "must use the same algorithm (set the same algorithm / COLLAB_ALGORITHM on every peer)"
            )
        return restore_state(self.local.opt, self.local.scheduler, metadata, tensors)


class GradientAveraging(AveragingScheme):
    """Average the peers' sample-weighted mean gradients; every peer then takes the same ``opt.step()``.

    With fp16 loss scaling one more buffer carries the overflow flag: its weighted mean is > 0 iff some peer of the
    round overflowed, and then every peer skips the update together.
    """

    def make_buffers(self) -> list[torch.Tensor]:
        buffers = [torch.zeros_like(param, device="cpu") for param in self.local.params]
        if self.local.scaling_loss:
            buffers.append(torch.zeros(1))
        return buffers

    @torch.no_grad()
    def write(self, buffers: Sequence[torch.Tensor], step: int) -> None:
        overflow = self.local.write_mean(buffers[: len(self.local.params)])
        if self.local.scaling_loss:  # unscaled once per step; a peer's inf/NaN must not reach the others
            buffers[-1].fill_(1.0 if overflow else 0.0)

    @torch.no_grad()
    def apply(self, buffers: Sequence[torch.Tensor], step: int) -> None:
        for grad, averaged in zip(self.local.grad_buffers(), buffers, strict=False):
            grad.copy_(averaged, non_blocking=True)
        overflow = self.local.scaling_loss and float(buffers[-1]) > 0
        self.local.apply(step, overflow=overflow)


class ParameterAveraging(AveragingScheme):
    """Each peer steps with its own mean gradient; then the peers average parameters and named optimizer statistics.

    If the round does not complete, the local step is rolled back (parameters, optimizer and scheduler state) and
    the accumulated gradients are kept for the retry.

    Args:
        local: this peer's accumulated gradients, optimizer and scheduler.
        statistics: names of per-parameter optimizer state tensors to average (e.g. ``["exp_avg_sq"]``).
        reuse_grad_buffers: whether ``param.grad`` is the accumulator (its sums are kept across the local step).

    Raises:
        ValueError: if a name is not a per-parameter tensor of the optimizer's state.
    """

    def __init__(self, local: LocalUpdate, statistics: Sequence[str], reuse_grad_buffers: bool):
        super().__init__(local)
        self.statistics = tuple(statistics)
        self.reuse_grad_buffers = reuse_grad_buffers
        self._rollback: tuple[tuple[dict[str, Any], list[torch.Tensor]], list[torch.Tensor]] | None = None
        self._create_optimizer_state()

    def _create_optimizer_state(self) -> None:
        """Create the optimizer state (changing nothing) so the statistics can be averaged from the first round."""
        opt, params = self.local.opt, self.local.params
        if any(len(opt.state.get(param, {})) for param in params):
            self._check_statistics()
            return
        # one step with zero gradients and learning rate 0 creates the state; step counters are then reset so the
        # first real update is exactly a fresh optimizer's first update
        saved_grads = [param.grad for param in params]
        saved_lrs = [group["lr"] for group in opt.param_groups]
        try:
            for param in params:
                param.grad = torch.zeros_like(param)
            for group in opt.param_groups:
                group["lr"] = 0.0
            opt.step()
        finally:
            for group, lr in zip(opt.param_groups, saved_lrs, strict=True):
                group["lr"] = lr
            for param, grad in zip(params, saved_grads, strict=True):
                param.grad = grad
        # zero every state entry (weight decay, for one, leaves non-zero moments after a zero-gradient step), so
        # that the state equals a fresh optimizer's lazily created state (SGD: exact when dampening is 0)
        with torch.no_grad():
            for param_state in opt.state.values():
                for key, value in param_state.items():
                    if isinstance(value, torch.Tensor):
                        value.zero_()
                    elif isinstance(value, (int, float)) and not isinstance(value, bool):
                        param_state[key] = type(value)(0)
        self._check_statistics()

    def _check_statistics(self) -> None:
        opt = self.local.opt
        for name in self.statistics:
            for param in self.local.params:
                value = opt.state.get(param, {}).get(name)
                if not isinstance(value, torch.Tensor) or value.shape != param.shape:
                    available = sorted(
                        key for key, v in opt.state.get(param, {}).items() if isinstance(v, torch.Tensor)
                    )
                    raise ValueError(
                        f"average_opt_statistics: {name!r} is not a per-parameter tensor in the state of "
                        f"{type(opt).__name__}; available names: {available}"
                    )

    def _local_tensors(self) -> list[torch.Tensor]:
        stats = [self.local.opt.state[param][name] for name in self.statistics for param in self.local.params]
        return [*self.local.params, *stats]

    def make_buffers(self) -> list[torch.Tensor]:
        return [tensor.detach().to("cpu", copy=True) for tensor in self._local_tensors()]

    @torch.no_grad()
    def write(self, buffers: Sequence[torch.Tensor], step: int) -> None:
        local = self.local
        state = capture_state(local.opt, local.scheduler, step)
        # with reuse_grad_buffers the local step turns param.grad into the mean in place: keep the sums
        saved_grads = [g.detach().clone() for g in local.grad_buffers()] if self.reuse_grad_buffers else []
        self._rollback = (state, saved_grads)
        local.step_alone(step)
        for buffer, tensor in zip(buffers, self._local_tensors(), strict=True):
            buffer.copy_(tensor)

    @torch.no_grad()
    def apply(self, buffers: Sequence[torch.Tensor], step: int) -> None:
        for tensor, averaged in zip(self._local_tensors(), buffers, strict=True):
            tensor.copy_(averaged)
        self._rollback = None

    @torch.no_grad()
    def discard(self) -> None:
        if self._rollback is None:
            return
        (metadata, tensors), saved_grads = self._rollback
        self._rollback = None
        restore_state(self.local.opt, self.local.scheduler, metadata, tensors)
        for grad, saved in zip(self.local.grad_buffers(), saved_grads, strict=False):
            grad.copy_(saved)


__all__ = ["AveragingScheme", "GradientAveraging", "ParameterAveraging"]
