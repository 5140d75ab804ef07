"""Swarm backups: a collaboration's state, downloaded by a monitor, as a file any peer can resume from.

A backup holds exactly what a joining peer downloads (:mod:`collab_core.state`: parameters, the whole optimizer
state, the scheduler state, the collaborative step and the state fingerprint), so restoring one is a state download
from disk. Each backup is a folder ``{run_id}-step{step:08d}/``:

* ``collab_backup.pt``: the backup. The core: ``CollaborativeOptimizer.load_state_dict(torch.load(file))``;
  Lightning: ``trainer.fit(model, ckpt_path=file)``;
* ``optimizer.bin`` (the same file, hard-linked) and ``scheduler.bin``: Accelerate's layout, so that
  ``accelerator.load_state(folder)`` resumes from it (``prepare_collaborative`` registers a hook that takes the
  weights from the optimizer state instead of a model file).

Parameters are matched by position in the optimizer, as in a download: the peer must build the same model and
optimizer.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

__all__ = [
    "BACKUP_FILE",
    "BACKUP_FORMAT",
    "backup_due",
    "backup_path",
    "is_backup",
    "make_backup",
    "newest_backup",
    "prune_backups",
    "write_backup",
]

BACKUP_FORMAT = "collab-training swarm backup"
BACKUP_VERSION = 1
#: the backup inside a backup folder
BACKUP_FILE = "collab_backup.pt"
_NAME = re.compile(r"^(?P<run>.+)-step(?P<step>\d{8})$")


def is_backup(checkpoint: Any) -> bool:
    """Whether ``checkpoint`` (a loaded file) is a swarm backup."""
    return isinstance(checkpoint, dict) and checkpoint.get("format") == BACKUP_FORMAT


def make_backup(run_id: str, metadata: dict[str, Any], tensors: list[Any]) -> dict[str, Any]:
    """The backup of a served state ``(metadata, tensors)``.

    Raises:
        ValueError: if the state has no integer step.
    """
    step = metadata.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"the served state has no valid step ({step!r}); it cannot be backed up")
    return {
        "format": BACKUP_FORMAT,
        "version": BACKUP_VERSION,
        "run_id": run_id,
        "step": step,
        "fingerprint": metadata.get("fingerprint", ""),
        "metadata": metadata,
        "tensors": list(tensors),
    }


def backup_due(step: int, last_backup_step: int | None, every: int) -> bool:
    """Whether a monitor that sees the collaboration at ``step`` should back it up now (pure).

    The first backup comes once the collaboration reached ``every`` steps (or at once, if it is already past that
    when the monitor starts); then every ``every`` steps after the last one written.
    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    return step >= (every if last_backup_step is None else last_backup_step + every)


def backup_path(directory: Path, run_id: str, step: int) -> Path:
    """The folder of the backup of ``run_id`` at ``step``."""
    return Path(directory) / f"{run_id}-step{step:08d}"


def _backups(directory: Path, run_id: str) -> list[tuple[int, Path]]:
    found = []
    for path in Path(directory).glob(f"{run_id}-step*"):
        match = _NAME.match(path.name)
        if match and match.group("run") == run_id and (path / BACKUP_FILE).is_file():
            found.append((int(match.group("step")), path))
    return sorted(found)


def newest_backup(directory: Path, run_id: str) -> Path | None:
    """The folder of the backup of ``run_id`` with the highest step in ``directory``, or None."""
    found = _backups(directory, run_id)
    return found[-1][1] if found else None


def prune_backups(directory: Path, run_id: str, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest backups of ``run_id``; returns the deleted folders."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    deleted = [path for _, path in _backups(directory, run_id)[:-keep]]
    for path in deleted:
        shutil.rmtree(path, ignore_errors=True)
    return deleted


def write_backup(directory: Path, backup: dict[str, Any], keep: int) -> Path:
    """Write ``backup`` as a backup folder, atomically (a partial folder never has the final name), and prune old
    ones; returns the folder."""
    import torch

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = backup_path(directory, backup["run_id"], backup["step"])
    partial = path.with_name(f".{path.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    torch.save(backup, partial / BACKUP_FILE)
    os.link(partial / BACKUP_FILE, partial / "optimizer.bin")  # Accelerate's name for the optimizer state
    scheduler = backup["metadata"].get("scheduler")
    if scheduler is not None:
        torch.save(scheduler, partial / "scheduler.bin")
    shutil.rmtree(path, ignore_errors=True)  # the same step backed up again
    os.replace(partial, path)
    prune_backups(directory, backup["run_id"], keep)
    return path
