"""The local processes of one peer (``accelerate launch --num_processes N``) act as one collaborative peer.

Only the main process talks to the collaboration (DHT, averaging, state downloads). DDP has already averaged the
gradients of all local processes when ``optimizer.step()`` runs on a sync step, so the main process hands that
gradient to the collaborative optimizer; afterwards it tells the other processes what happened and, when the
parameters changed, broadcasts them (torch.distributed collectives over the process group Accelerate created).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

_FIELDS = ("failed", "updated", "changed", "step", "num_peers", "scale", "params_changed")


@dataclass(frozen=True)
class StepOutcome:
    """What one sync-step call of ``optimizer.step()`` did on the main process.

    Attributes:
        updated: the parameters were updated by a collaborative step (averaged gradients applied).
        changed: the collaborative step counter changed (an update, a skipped overflow step, or a state download).
        step: the collaborative step after the call.
        num_peers: peers in the collaboration (last view).
        scale: the gradient scaler's scale after the call (0.0 without a scaler).
        failed: the main process raised; the other processes raise too instead of waiting forever.
        params_changed: the parameters changed without a change of the collaborative step (DiLoCo's inner step):
            the other processes receive them too.
    """

    updated: bool
    changed: bool
    step: int
    num_peers: int
    scale: float = 0.0
    failed: bool = False
    params_changed: bool = False


class LocalGroup:
    """Collectives between the processes of this peer; every method is a no-op with a single process.

    Args:
        num_processes: processes of this peer (``accelerator.num_processes``).
        is_main: whether this is the process that talks to the collaboration.
        device: where collective tensors live (``accelerator.device``: CPU for gloo, the GPU for NCCL).
    """

    def __init__(self, num_processes: int, is_main: bool, device: torch.device) -> None:
        self.num_processes, self.is_main, self.device = num_processes, is_main, device
        if num_processes > 1 and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                f"accelerator.num_processes is {num_processes}, but torch.distributed is not initialised; create the "
                "Accelerator before calling prepare_collaborative (inside the script started by accelerate launch)."
            )

    @property
    def distributed(self) -> bool:
        return self.num_processes > 1

    def total(self, value: int) -> int:
        """Sum ``value`` over the processes of this peer."""
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(tensor)
        return int(tensor.item())

    def share_outcome(self, outcome: StepOutcome | None) -> StepOutcome:
        """Send the main process's ``outcome`` to every process (the others pass None)."""
        if not self.distributed:
            assert outcome is not None
            return outcome
        values = [float(getattr(outcome, name)) for name in _FIELDS] if outcome is not None else [0.0] * len(_FIELDS)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.broadcast(tensor, src=0)
        received = dict(zip(_FIELDS, tensor.tolist(), strict=True))
        return StepOutcome(
            updated=bool(received["updated"]),
            changed=bool(received["changed"]),
            step=int(received["step"]),
            num_peers=int(received["num_peers"]),
            scale=received["scale"],
            failed=bool(received["failed"]),
            params_changed=bool(received["params_changed"]),
        )

    def share_tensors(self, tensors: Sequence[torch.Tensor]) -> None:
        """Overwrite ``tensors`` everywhere with the main process's values (in place; one collective per dtype)."""
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
        """The main process's ``value`` (small, picklable), on every process."""
        if not self.distributed:
            return value
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]


__all__ = ["LocalGroup", "StepOutcome"]
