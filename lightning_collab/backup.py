"""Resuming a Lightning peer from a swarm backup (``collab monitor --backup-dir``) with ``fit(ckpt_path=...)``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["checkpoint_from_backup"]


def checkpoint_from_backup(backup: Mapping[str, Any], model_state: Mapping[str, Any], version: str) -> dict[str, Any]:
    """A Lightning checkpoint that resumes from ``backup`` (pure).

    The backup has no parameter names (it is what peers serve each other: tensors in the optimizer's order), so the
    model's own ``state_dict`` stands in for the weights, and the backup goes in as the collaborative optimizer's
    state: ``CollaborativeOptimizer.load_state_dict`` restores parameters, optimizer and scheduler state and the
    collaborative step from it, as a state download does. The loops start afresh (the collaborative step is what
    counts); the scheduler state is the backup's.

    Args:
        backup: a loaded swarm backup (:func:`collab_core.backup.is_backup`).
        model_state: the LightningModule's current ``state_dict()``.
        version: the Lightning version, recorded as the checkpoint's.
    """
    scheduler = backup["metadata"].get("scheduler")
    return {
        "state_dict": dict(model_state),
        "optimizer_states": [dict(backup)],
        "lr_schedulers": [scheduler] if scheduler is not None else [],
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": version,
    }
