"""The optimizer a follower process holds: a local process of a peer that is not the one talking to the collaboration.

One job: stand in for the collaborative optimizer on local ranks > 0 (see :mod:`collab_core.local_peer`). A follower
never steps its optimizer: after every change of the collaborative step it receives the leader's parameters,
learning rates and scheduler state. It keeps the leader's step counter and peer count for display, the gradient
scaler's scale (DDP averages scaled gradients, so every process needs one scale), clears ``param.grad`` when the
leader's step cleared it, and reads and writes checkpoints in the collaborative optimizer's format, so that a trainer
which restores a checkpoint on every process (Lightning, Accelerate) works unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

from collab_core.backup import is_backup
from collab_core.local_peer import LeaderOutcome, LocalReplicas
from collab_core.state import restore_state
from collab_core.wrapped_optimizer import WrappedOptimizerView


class FollowerOptimizer(WrappedOptimizerView):
    """The user's optimizer on a follower process, driven by the leader's outcomes instead of ``step()``.

    It is a ``torch.optim.Optimizer`` (parameter groups and state are the user's optimizer's), so a trainer can hold
    it where the leader holds the collaborative optimizer.

    Args:
        replicas: this process's leader/follower protocol (its optimizer and scheduler are the user's).
        reuse_grad_buffers: ``param.grad`` holds the accumulation (then :meth:`zero_grad` never clears it, as on the
            leader).
        grad_scaler: the fp16 gradient scaler of this process, or None.
    """

    def __init__(self, replicas: LocalReplicas, *, reuse_grad_buffers: bool, grad_scaler: Any | None = None) -> None:
        # no torch.optim.Optimizer.__init__: the parameters and their state stay the user's optimizer's
        self.replicas = replicas
        self.opt: torch.optim.Optimizer = replicas.optimizer
        self.scheduler = replicas.scheduler
        self.reuse_grad_buffers = reuse_grad_buffers
        self.grad_scaler = grad_scaler
        #: the leader's collaborative step (as of the last call)
        self.local_step = 0
        #: peers in the collaboration, as the leader last saw them
        self.num_peers = 1

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """Never called: a follower receives the leader's parameters instead of stepping."""
        raise RuntimeError(
            "a follower process of a collaborative peer does not step its optimizer: the integration hands every "
            "step to the leader (local rank 0) and copies its parameters here"
        )

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear ``param.grad``, except with ``reuse_grad_buffers`` (it holds counted samples, as on the leader)."""
        if not self.reuse_grad_buffers:
            self.opt.zero_grad(set_to_none=set_to_none)

    def follow(self, outcome: LeaderOutcome) -> None:
        """After a step call whose parameters are the leader's now: take over its step, peer count and gradient
        scale, and empty ``param.grad`` where the leader's step emptied it."""
        self.local_step, self.num_peers = outcome.step, outcome.num_peers
        if self.grad_scaler is not None and outcome.scale and self.grad_scaler.get_scale() != outcome.scale:
            self.grad_scaler.update(outcome.scale)
        self.replicas.clear_follower_gradients(outcome, self.reuse_grad_buffers)

    def state_dict(self) -> dict[str, Any]:
        """Optimizer state, scheduler state and the collaborative step (``collab_core`` checkpoint format)."""
        return {
            "optimizer": self.opt.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "local_step": self.local_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a checkpoint of the collaborative optimizer (or of this class), a plain optimizer state dict, or a
        swarm backup (parameters too, as in a state download)."""
        if is_backup(state_dict):
            self.local_step = restore_state(self.opt, self.scheduler, state_dict["metadata"], state_dict["tensors"])
            return
        if "local_step" not in state_dict:
            self.opt.load_state_dict(state_dict)
            return
        self.opt.load_state_dict(state_dict["optimizer"])
        if self.scheduler is not None and state_dict.get("scheduler") is not None:
            self.scheduler.load_state_dict(state_dict["scheduler"])
        self.local_step = int(state_dict["local_step"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(local_step={self.local_step}, opt={self.opt!r})"


__all__ = ["FollowerOptimizer"]
