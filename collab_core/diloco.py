"""DiLoCo: every ``step()`` is an inner optimizer step on this peer; peers meet only once per outer step.

DiLoCo (Douillard et al., 2023) trades communication for local compute. Each peer trains its own replica θᵢ with its
own (inner) optimizer, e.g. AdamW, one inner step per ``step()`` call. Once the whole collaboration has accumulated
``target_batch_size`` samples since the last outer step, the peers run one round on the same engine as every other
scheme (:class:`~collab_core.collaboration.Collaboration`: planner, fingerprints, downloads, fork healing):

1. each peer writes its pseudo-gradient Δᵢ = θ_global − θᵢ;
2. the round averages them weighted by samples: Δ = Σ nᵢ Δᵢ / Σ nᵢ, nᵢ being the samples peer i trained on since
   the last outer step (the averager weights every peer by the sample count it reports);
3. the outer optimizer (SGD with Nesterov momentum over θ_global, float32 on the CPU) steps with gradient Δ;
4. every peer sets θᵢ = θ_global and steps its learning-rate scheduler once.

The inner optimizer's state (e.g. Adam moments) never leaves the peer and persists across outer steps. A round that
fails with nobody stepping changes nothing: the peer keeps its local progress (θᵢ and its sample count) and
contributes all of it to the next outer round. A joining peer downloads θ_global, the outer optimizer's momentum and
hyperparameters, the step, the scheduler state and the inner learning rates; the inner optimizer's state is never
downloaded, so a joiner that downloads before its first step starts with a fresh inner optimizer. A peer that
downloads because it missed an outer step keeps its inner optimizer state, as it does across every outer step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from collab_core.fingerprint import tensors_fingerprint
from collab_core.local_update import LocalUpdate, all_finite
from collab_core.log import get_logger
from collab_core.optimizer import CollaborativeOptimizer
from collab_core.schemes import AveragingScheme
from collab_core.state import capture_state, restore_state

logger = get_logger(__name__)

#: what a DiLoCo state carries in its metadata, so that peers of another algorithm refuse it with a clear message
ALGORITHM_TAG = "diloco"
#: mixed into the initial fingerprint: a DiLoCo replica and a gradient-mode replica of one model never average together
_FINGERPRINT_TAG = torch.tensor(list(ALGORITHM_TAG.encode()), dtype=torch.uint8)


def check_outer_settings(outer_lr: Any, outer_momentum: Any, nesterov: Any) -> None:
    """Validate the outer optimizer's hyperparameters.

    Raises:
        ValueError: naming the argument and the fix.
    """
    if isinstance(outer_lr, bool) or not isinstance(outer_lr, (int, float)) or not math.isfinite(outer_lr):
        raise ValueError(f"outer_lr must be a finite number > 0 (DiLoCo uses 0.7), got {outer_lr!r}")
    if outer_lr <= 0:
        raise ValueError(f"outer_lr must be > 0 (DiLoCo uses 0.7), got {outer_lr!r}")
    if isinstance(outer_momentum, bool) or not isinstance(outer_momentum, (int, float)) or not 0 <= outer_momentum < 1:
        raise ValueError(f"outer_momentum must be a number in [0, 1) (DiLoCo uses 0.9), got {outer_momentum!r}")
    if not isinstance(nesterov, bool):
        raise ValueError(f"nesterov must be True or False, got {nesterov!r}")
    if nesterov and outer_momentum == 0:
        raise ValueError("nesterov=True needs outer_momentum > 0 (e.g. 0.9); or set nesterov=False")


class DiLoCoAveraging(AveragingScheme):
    """The DiLoCo scheme (see the module docstring): inner steps locally, the averaged pseudo-gradient outside.

    Args:
        local: this peer's inner optimizer, scheduler and sample count (built with ``keep_gradients=False``).
        outer_lr: the outer SGD's learning rate.
        outer_momentum: its momentum.
        nesterov: whether its momentum is Nesterov's.
    """

    steps_locally = True

    def __init__(self, local: LocalUpdate, outer_lr: float, outer_momentum: float, nesterov: bool):
        super().__init__(local)
        #: θ_global: float32 CPU copies of the parameters, whatever their dtype and device
        self.global_params = [param.detach().to("cpu", torch.float32, copy=True) for param in local.params]
        #: the outer optimizer over θ_global
        self.outer_opt = torch.optim.SGD(self.global_params, lr=outer_lr, momentum=outer_momentum, nesterov=nesterov)

    # ------------------------------------------------------------------ every step() call

    def add_micro_batch(self, batch_size: int) -> None:
        """One inner step of the user's optimizer with this micro-batch's gradients; its samples are counted."""
        self.local.opt.step()
        self.local.opt.zero_grad(set_to_none=True)
        self.local.add(batch_size)

    # ------------------------------------------------------------------ the outer step

    def make_buffers(self) -> list[torch.Tensor]:
        return [torch.zeros_like(param) for param in self.global_params]  # Δ is float32, whatever θᵢ is

    @torch.no_grad()
    def write(self, buffers: Sequence[torch.Tensor], step: int) -> None:
        self._write_pseudo_gradient(buffers)

    @torch.no_grad()
    def _write_pseudo_gradient(self, out: Sequence[torch.Tensor]) -> None:
        for buffer, global_param, param in zip(out, self.global_params, self.local.params, strict=True):
            buffer.copy_(global_param).sub_(param.detach().to("cpu", torch.float32))

    @torch.no_grad()
    def apply(self, buffers: Sequence[torch.Tensor], step: int) -> None:
        self._outer_step(buffers, step)

    def step_alone(self, step: int) -> None:
        """Nobody else is at this step: the outer step with this peer's own pseudo-gradient."""
        delta = [torch.empty_like(param) for param in self.global_params]
        self._write_pseudo_gradient(delta)
        self._outer_step(delta, step)

    # discard(): nothing to undo. write() changed no local state, so θᵢ and the sample count (this peer's local
    # progress) are kept and go into the next outer round.

    @torch.no_grad()
    def _outer_step(self, delta: Sequence[torch.Tensor], step: int) -> None:
        """θ_global ← outer SGD step with gradient ``delta``; θᵢ ← θ_global; the scheduler once."""
        local = self.local
        local.last_step_skipped = not all_finite(delta)
        if local.last_step_skipped:
            local.nonfinite_steps += 1
            logger.warning(
                f"{local.prefix}: the averaged pseudo-gradient of outer step {step} contains inf/NaN (a peer's "
                "inner training diverged, or it sent non-finite values); every peer of the round keeps the global "
                "parameters and drops its local progress"
            )
        else:
            for global_param, grad in zip(self.global_params, delta, strict=True):
                global_param.grad = grad
            try:
                self.outer_opt.step()
            finally:
                for global_param in self.global_params:
                    global_param.grad = None
        for param, global_param in zip(local.params, self.global_params, strict=True):
            param.copy_(global_param)
        if local.scheduler is not None:
            local.scheduler.step()

    # ------------------------------------------------------------------ state downloads and checkpoints

    def initial_fingerprint(self) -> str:
        return tensors_fingerprint([_FINGERPRINT_TAG, *self.local.params])

    def capture(self, step: int) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """θ_global, the outer optimizer's state and hyperparameters, the scheduler, the inner learning rates."""
        metadata, tensors = capture_state(self.outer_opt, self.local.scheduler, step)
        metadata["algorithm"] = ALGORITHM_TAG
        metadata["inner_hyperparameters"] = [
            {key: value for key, value in group.items() if key != "params"} for group in self.local.opt.param_groups
        ]
        return metadata, tensors

    @torch.no_grad()
    def restore(self, metadata: dict[str, Any], tensors: Sequence[torch.Tensor]) -> int:
        """Load another peer's state: θᵢ = θ_global; the inner optimizer's state stays (fresh on a joiner)."""
        if not isinstance(metadata, dict) or metadata.get("algorithm") != ALGORITHM_TAG:
            theirs = metadata.get("algorithm", "gradient or adaptive") if isinstance(metadata, dict) else "unknown"
            raise ValueError(
                f"the serving peer runs algorithm {theirs!r}, this peer 'diloco': all peers of a run must use the "
                "same algorithm (set the same algorithm / COLLAB_ALGORITHM on every peer, or use another run_id)"
            )
        inner = metadata.get("inner_hyperparameters")
        if not isinstance(inner, list) or len(inner) != len(self.local.opt.param_groups):
            raise ValueError("the downloaded state has different inner optimizer parameter groups than this optimizer")
        step = restore_state(self.outer_opt, self.local.scheduler, metadata, tensors)
        for group, hyperparameters in zip(self.local.opt.param_groups, inner, strict=True):
            group.update(hyperparameters)  # the learning rate the scheduler set, on every peer the same
        for param, global_param in zip(self.local.params, self.global_params, strict=True):
            param.copy_(global_param)
        return step

    def state_dict(self) -> dict[str, Any]:
        """θ_global and the outer optimizer's state dict (θᵢ is the model's own checkpoint)."""
        return {
            "algorithm": ALGORITHM_TAG,
            "global_params": [param.clone() for param in self.global_params],
            "outer_optimizer": self.outer_opt.state_dict(),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore θ_global and the outer optimizer; a checkpoint without them (another algorithm's) makes the
        current parameters θ_global, with fresh outer momentum."""
        if not state:
            for global_param, param in zip(self.global_params, self.local.params, strict=True):
                global_param.copy_(param.detach())
            self.outer_opt.state.clear()
            return
        saved = state["global_params"]
        if [tuple(t.shape) for t in saved] != [tuple(p.shape) for p in self.global_params]:
            raise ValueError("the checkpoint's global (outer) parameters do not match this model's parameters")
        for global_param, value in zip(self.global_params, saved, strict=True):
            global_param.copy_(value)
        self.outer_opt.load_state_dict(state["outer_optimizer"])


class DiLoCoOptimizer(CollaborativeOptimizer):
    """DiLoCo over the collaboration: ``step()`` takes an inner step; an outer step every ``target_batch_size``.

    Call ``step()`` once per micro-batch after ``backward()``, as with :class:`~collab_core.CollaborativeOptimizer`.
    Each call is one step of ``inner_opt`` on this peer's micro-batch (then ``param.grad`` is cleared) plus its sample
    count. When the collaboration has accumulated ``target_batch_size`` samples since the last outer step, the outer
    step runs: the sample-weighted mean pseudo-gradient Δ = mean(θ_global − θᵢ) of the peers of the round, one step
    of the outer SGD (:attr:`outer_optimizer`) on θ_global with gradient Δ, θᵢ = θ_global on every peer, and one step
    of ``scheduler``. See :mod:`collab_core.diloco` for failures and what a joining peer gets.

    Choose ``target_batch_size`` = inner steps per outer step (H) x the collaboration's samples per inner step; the
    paper uses H = 500, outer lr 0.7, momentum 0.9 with Nesterov, inner AdamW.

    Args:
        inner_opt: this peer's optimizer over the model's parameters (AdamW in the paper); its state stays local.
        dht: a running ``hivemind.DHT`` connected to the other peers.
        prefix: the run's name in the DHT (letters, digits, ``_``, ``-``).
        target_batch_size: samples the collaboration trains on between outer steps.
        batch_size_per_step: samples per ``step()`` call when ``step`` is called without ``batch_size``.
        outer_lr: the outer SGD's learning rate (> 0).
        outer_momentum: its momentum, in [0, 1).
        nesterov: Nesterov momentum (needs ``outer_momentum > 0``).
        scheduler: a learning-rate scheduler of ``inner_opt``, stepped once per outer step on every peer.
        **kwargs: the networking arguments of :class:`~collab_core.CollaborativeOptimizer` (``step_tolerance``,
            ``averaging_timeout``, ``matchmaking_time``, ``client_mode``, the refresh periods, ``compression``
            (applied to the pseudo-gradient), ``verbose``, ...). ``reuse_grad_buffers``, ``accumulate_grads_on`` and
            ``grad_scaler`` do not apply: every ``step()`` consumes its gradients in the inner step.

    Raises:
        ValueError: for invalid arguments (the message names the argument and the fix).
        TypeError: for unknown keyword arguments.
    """

    _keeps_gradients = False

    def __init__(
        self,
        inner_opt: torch.optim.Optimizer,
        *,
        dht: Any,
        prefix: str,
        target_batch_size: int,
        batch_size_per_step: int | None = None,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        nesterov: bool = True,
        scheduler: Any | None = None,
        **kwargs: Any,
    ):
        check_outer_settings(outer_lr, outer_momentum, nesterov)
        if kwargs.pop("reuse_grad_buffers", False):
            raise ValueError(
                "reuse_grad_buffers=True does not apply to DiLoCo: every step() takes an inner optimizer step and "
                "clears param.grad, nothing is accumulated. Set reuse_grad_buffers=False."
            )
        if kwargs.pop("accumulate_grads_on", None) is not None:
            raise ValueError(
                "accumulate_grads_on does not apply to DiLoCo: gradients are consumed by the inner step at every "
                "step() call, nothing is accumulated. Leave accumulate_grads_on unset."
            )
        if kwargs.pop("grad_scaler", None) is not None:
            raise ValueError(
                "grad_scaler (fp16 loss scaling) is not supported by DiLoCoOptimizer: the inner steps would need "
                "the scaler's step and update at every call. Train the inner steps in bf16 (or fp32) instead."
            )
        self.outer_lr, self.outer_momentum, self.nesterov = float(outer_lr), float(outer_momentum), nesterov
        super().__init__(
            inner_opt,
            dht=dht,
            prefix=prefix,
            target_batch_size=target_batch_size,
            batch_size_per_step=batch_size_per_step,
            scheduler=scheduler,
            **kwargs,
        )

    def _make_scheme(self, local: LocalUpdate) -> AveragingScheme:
        return DiLoCoAveraging(local, self.outer_lr, self.outer_momentum, self.nesterov)

    @property
    def inner_optimizer(self) -> torch.optim.Optimizer:
        """The user's optimizer, stepped at every ``step()`` call (same as ``opt``)."""
        return self.opt

    @property
    def outer_optimizer(self) -> torch.optim.SGD:
        """The outer SGD over the global parameters θ_global (float32, CPU)."""
        scheme = self.collaboration.scheme
        assert isinstance(scheme, DiLoCoAveraging)
        return scheme.outer_opt

    @property
    def global_parameters(self) -> list[torch.Tensor]:
        """θ_global: the parameters of the last outer step (float32 CPU tensors, in the inner optimizer's order)."""
        return self.outer_optimizer.param_groups[0]["params"]

    @property
    def local_step(self) -> int:
        """Outer steps this peer has taken (the same on every peer of an outer step)."""
        return self.collaboration.local_step


__all__ = ["DiLoCoAveraging", "DiLoCoOptimizer", "check_outer_settings"]
