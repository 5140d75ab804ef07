"""The local processes of one peer (e.g. ``accelerate launch --num_processes N``) act as one collaborative peer.

One job: keep a leader and its followers identical around every ``step()`` call, whatever trainer drives them. Only
the leader (local rank 0) talks to the collaboration (DHT, averaging, state downloads). The caller's data-parallel
wrapper (DDP) has already averaged the gradients of all local processes when the step runs, so the leader hands that
gradient to the collaborative optimizer; afterwards it tells the followers what happened and, when the parameters
changed, broadcasts them with the learning rates and the scheduler state (torch.distributed collectives over the
process group the trainer created; gloo on CPU, NCCL on GPU). No networking beyond the local process group here.

Accelerate's optimizer wrapper (``accelerate_collab.optimizer``) and Lightning's multi-device strategy
(``lightning_collab.multi_device``) use it, with :class:`collab_core.follower.FollowerOptimizer` on the followers;
nothing here knows about any trainer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

Result = TypeVar("Result")

_FIELDS = ("failed", "updated", "changed", "step", "num_peers", "scale", "params_changed")


@dataclass(frozen=True)
class LeaderOutcome:
    """What one step call did on the leader, as every local process learns it.

    Attributes:
        updated: the parameters were updated by a collaborative step (averaged gradients applied).
        changed: the collaborative step counter changed (an update, a skipped overflow step, or a state download).
        step: the collaborative step after the call.
        num_peers: peers in the collaboration (last view).
        scale: the gradient scaler's scale after the call (0.0 without a scaler).
        failed: the leader raised; the followers raise too instead of waiting forever.
        params_changed: the parameters changed without a change of the collaborative step (DiLoCo's inner step):
            the followers receive them too.
    """

    updated: bool
    changed: bool
    step: int
    num_peers: int
    scale: float = 0.0
    failed: bool = False
    params_changed: bool = False


def leader_outcome(collaborative: Any, scale: float = 0.0) -> LeaderOutcome:
    """What the last ``step()`` of the leader's collaborative optimizer did, as the followers need to know it.

    Args:
        collaborative: the leader's ``collab_core.CollaborativeOptimizer`` (or a subclass), right after ``step()``.
        scale: the gradient scaler's scale after the call (0.0 without a scaler).
    """
    from collab_core.collaboration import StepOutcome  # the engine (and hivemind) only where a leader steps

    report = collaborative.last_step_report
    assert report is not None, "leader_outcome() is called after the collaborative optimizer's step()"
    return LeaderOutcome(
        # SKIPPED: fp16 overflow, or inf/NaN in the averaged gradient (every member of the round skipped it)
        updated=report.outcome is StepOutcome.UPDATED,
        changed=report.stepped,
        step=collaborative.local_step,
        num_peers=collaborative.collaboration_state.num_peers,
        scale=scale,
        params_changed=report.parameters_changed,  # DiLoCo: an inner step at every call
    )


class LocalGroup:
    """Collectives between the processes of this peer; every method is a no-op with a single process.

    Args:
        num_processes: processes of this peer.
        is_main: whether this is the process that talks to the collaboration (the leader).
        device: where collective tensors live (CPU for gloo, the GPU for NCCL).
    """

    def __init__(self, num_processes: int, is_main: bool, device: torch.device) -> None:
        self.num_processes, self.is_main, self.device = num_processes, is_main, device
        if num_processes > 1 and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                f"this peer has {num_processes} local processes, but torch.distributed is not initialised; create "
                "the trainer's process group first (e.g. the Accelerator, inside the script accelerate launch starts)."
            )

    @property
    def distributed(self) -> bool:
        """Whether this peer has more than one local process."""
        return self.num_processes > 1

    def total(self, value: int) -> int:
        """Sum ``value`` over the processes of this peer."""
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(tensor)
        return int(tensor.item())

    def share_outcome(self, outcome: LeaderOutcome | None) -> LeaderOutcome:
        """Send the leader's ``outcome`` to every process (the followers pass None)."""
        if not self.distributed:
            assert outcome is not None
            return outcome
        values = [float(getattr(outcome, name)) for name in _FIELDS] if outcome is not None else [0.0] * len(_FIELDS)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.broadcast(tensor, src=0)
        received = dict(zip(_FIELDS, tensor.tolist(), strict=True))
        return LeaderOutcome(
            updated=bool(received["updated"]),
            changed=bool(received["changed"]),
            step=int(received["step"]),
            num_peers=int(received["num_peers"]),
            scale=received["scale"],
            failed=bool(received["failed"]),
            params_changed=bool(received["params_changed"]),
        )

    def share_tensors(self, tensors: Sequence[torch.Tensor]) -> None:
        """Overwrite ``tensors`` everywhere with the leader's values (in place; one collective per dtype)."""
        if not self.distributed:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for tensor in tensors:
            by_dtype.setdefault(tensor.dtype, []).append(tensor)
        with torch.no_grad():
            for group in by_dtype.values():
                flat = torch.cat([t.detach().reshape(-1).to(self.device) for t in group])
                dist.broadcast(flat, src=0)
                offset = 0
                for tensor in group:
                    tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
                    offset += tensor.numel()

    def share_object(self, value: Any) -> Any:
        """The leader's ``value`` (small, picklable), on every process."""
        if not self.distributed:
            return value
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def run_on_leader(self, action: Callable[[], Result], what: str) -> Result | None:
        """Run ``action`` on the leader only (e.g. joining the collaboration); the followers learn whether it failed.

        Args:
            action: what the leader does.
            what: the action in words, for the followers' error ("join the collaboration").

        Returns:
            ``action()``'s result on the leader, None on the followers.

        Raises:
            RuntimeError: on a follower, when the leader's ``action`` raised (the leader re-raises its own error).
        """
        if self.is_main:
            try:
                result = action()
            except BaseException as failure:
                self.share_object(f"{type(failure).__name__}: {failure}")  # release the followers, which wait here
                raise
            self.share_object(None)
            return result
        error = self.share_object(None)
        if error is not None:
            raise RuntimeError(f"the main process of this peer could not {what}: {error}")
        return None


class LocalReplicas:
    """The leader/follower protocol of one step call: count, contribute on the leader, share, follow.

    Args:
        group: the local processes of this peer.
        optimizer: the user's optimizer on this process (its parameters and learning rates are kept identical).
        scheduler: the user's learning-rate scheduler on this process, or None.
    """

    def __init__(self, group: LocalGroup, optimizer: torch.optim.Optimizer, scheduler: Any | None = None) -> None:
        self.group, self.optimizer, self.scheduler = group, optimizer, scheduler
        self.params = [param for param_group in optimizer.param_groups for param in param_group["params"]]

    def step(self, samples: int, contribute: Callable[[int], LeaderOutcome] | None) -> LeaderOutcome:
        """One step call on every local process.

        Args:
            samples: this process's samples since the last call; the leader reports the sum over the processes.
            contribute: on the leader, hands the peer's samples to the collaboration and says what happened; None on
                the followers.

        Returns:
            The leader's outcome; parameters, learning rates and scheduler state are the leader's afterwards.

        Raises:
            RuntimeError: on a follower, when the leader raised (the leader re-raises its own error).
        """
        peer_samples = self.group.total(samples)
        outcome: LeaderOutcome | None = None
        if contribute is not None:
            try:
                outcome = contribute(peer_samples)
            except BaseException:
                if self.group.distributed:  # release the followers, which wait for the outcome
                    self.group.share_outcome(LeaderOutcome(False, False, 0, 0, failed=True))
                raise
        outcome = self.group.share_outcome(outcome)
        if outcome.failed:
            raise RuntimeError("the main process of this peer failed in optimizer.step() (see its error); this "
                               "process stops too")  # fmt: skip
        self.synchronize(outcome)
        return outcome

    def synchronize(self, outcome: LeaderOutcome) -> None:
        """After a call whose parameters changed: the leader's parameters, learning rates and scheduler state."""
        if not (outcome.changed or outcome.params_changed) or not self.group.distributed:
            return
        self.group.share_tensors(self.params)
        lr_state = self.group.share_object(self._lr_state() if self.group.is_main else None)
        if not self.group.is_main:
            self._load_lr_state(lr_state)

    def clear_follower_gradients(self, outcome: LeaderOutcome, reuse_grad_buffers: bool) -> None:
        """On a follower: empty ``param.grad`` where the leader's step emptied it (after accumulating it, or after a
        step or download; with reused buffers only after a change of the collaborative step)."""
        if self.group.is_main or not (outcome.changed or not reuse_grad_buffers):
            return
        with torch.no_grad():
            for param in self.params:
                if param.grad is not None:
                    param.grad.zero_()

    def _lr_state(self) -> dict[str, Any]:
        return {
            "lrs": [param_group["lr"] for param_group in self.optimizer.param_groups],
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
        }

    def _load_lr_state(self, lr_state: dict[str, Any]) -> None:
        for param_group, lr in zip(self.optimizer.param_groups, lr_state["lrs"], strict=True):
            param_group["lr"] = lr
        if self.scheduler is not None and lr_state["scheduler"] is not None:
            self.scheduler.load_state_dict(lr_state["scheduler"])


__all__ = ["LeaderOutcome", "LocalGroup", "LocalReplicas", "leader_outcome"]
