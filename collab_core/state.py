"""What a peer's training state is, as one flat list of tensors plus small metadata.

Used for state downloads between peers (hivemind sends ``(metadata, tensors)``) and mirrors what
``CollaborativeOptimizer.state_dict`` saves locally: parameters, the whole optimizer state (so momentum and Adam
moments are identical after a download), the scheduler state and the collaborative step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

STATE_FORMAT_VERSION = 1


class IncompleteStateError(ValueError):
    """A downloaded state has fewer tensors than its layout lists (the serving peer stopped mid-transfer)."""


def _numbered_params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [param for group in opt.param_groups for param in group["params"]]


def capture_state(opt: torch.optim.Optimizer, scheduler: Any, step: int) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """Snapshot ``(metadata, tensors)``: parameters first, then every tensor of the optimizer state (CPU copies)."""
    params = _numbered_params(opt)
    tensors: list[torch.Tensor] = [param.detach().cpu().clone() for param in params]
    layout: list[list[Any]] = []
    param_index = {id(param): index for index, param in enumerate(params)}
    for param, param_state in opt.state.items():
        index = param_index.get(id(param))
        if index is None:
            continue
        for key in sorted(param_state):
            value = param_state[key]
            if isinstance(value, torch.Tensor):
                layout.append([index, key, "tensor", None])
                tensors.append(value.detach().cpu().clone())
            else:
                layout.append([index, key, "value", value])
    groups = []
    for group in opt.param_groups:
        hyperparameters = {key: value for key, value in group.items() if key != "params"}
        hyperparameters["params"] = [param_index[id(param)] for param in group["params"]]
        groups.append(hyperparameters)
    metadata = {
        "version": STATE_FORMAT_VERSION,
        "step": int(step),
        "param_shapes": [list(param.shape) for param in params],
        "param_groups": groups,
        "optimizer_state_layout": layout,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
    }
    return metadata, tensors


def restore_state(
    opt: torch.optim.Optimizer, scheduler: Any, metadata: dict[str, Any], tensors: Sequence[torch.Tensor]
) -> int:
    """Load a snapshot made by :func:`capture_state` (possibly on another peer); returns its collaborative step.

    Raises:
        ValueError: if the snapshot does not fit this model/optimizer (different architecture or format).
    """
    if not isinstance(metadata, dict) or metadata.get("version") != STATE_FORMAT_VERSION:
        raise ValueError(f"unsupported state format: expected version {STATE_FORMAT_VERSION}")
    params = _numbered_params(opt)
    shapes = [list(param.shape) for param in params]
    if metadata["param_shapes"] != shapes:
        raise ValueError(
            "the downloaded state does not match this model: parameter shapes differ "
            f"({len(metadata['param_shapes'])} tensors vs {len(shapes)} here). Do all peers train the same model?"
        )
    layout = metadata["optimizer_state_layout"]
    expected = len(params) + sum(kind == "tensor" for _, _, kind, _ in layout)
    if len(tensors) != expected:
        raise IncompleteStateError(f"the downloaded state is incomplete: {len(tensors)} tensors instead of {expected}")

    optimizer_state: dict[int, dict[str, Any]] = {}
    tensor_iter = iter(tensors[len(params) :])
    for index, key, kind, value in layout:
        optimizer_state.setdefault(int(index), {})[key] = next(tensor_iter) if kind == "tensor" else value
    param_groups = [dict(group) for group in metadata["param_groups"]]
    if [len(group["params"]) for group in param_groups] != [len(group["params"]) for group in opt.param_groups]:
        raise ValueError("the downloaded state has different optimizer parameter groups than this optimizer")

    with torch.no_grad():
        for param, value in zip(params, tensors[: len(params)], strict=True):
            param.copy_(value.to(device=param.device, dtype=param.dtype))
    opt.load_state_dict({"state": optimizer_state, "param_groups": param_groups})
    if scheduler is not None and metadata.get("scheduler") is not None:
        scheduler.load_state_dict(metadata["scheduler"])
    return int(metadata["step"])


__all__ = ["capture_state", "restore_state", "IncompleteStateError", "STATE_FORMAT_VERSION"]
