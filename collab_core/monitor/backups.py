"""The monitor's backup job: download the collaboration's state every ``every`` steps and write a backup."""

from __future__ import annotations

from pathlib import Path

import hivemind
import torch

from collab_core.averager import CollaborativeAverager
from collab_core.backup import backup_due, make_backup, write_backup
from collab_core.log import get_logger
from collab_core.sync import StateSynchronizer

logger = get_logger(__name__)

__all__ = ["SwarmBackups"]


class SwarmBackups:
    """Downloads states like a joining peer does (a client-mode averager that serves nothing) and writes backups.

    Args:
        dht: the monitor's DHT.
        run_id: the run's name.
        directory: where backups go.
        every: back up every this many collaborative steps.
        keep: keep this many newest backups.
        timeout: seconds a download may go without progress (a large state over a slow link may take longer in
            all; its progress is logged).
    """

    def __init__(
        self, dht: hivemind.DHT, run_id: str, directory: Path, *, every: int, keep: int, timeout: float = 60.0
    ) -> None:
        if every < 1 or keep < 1:
            raise ValueError(f"--backup-every and --keep must be >= 1, got {every} and {keep}")
        self.run_id, self.directory, self.every, self.keep, self.timeout = run_id, Path(directory), every, keep, timeout
        self.last_step: int | None = None
        self.written: list[Path] = []
        self.averager = CollaborativeAverager(
            [torch.zeros(1)],
            dht,
            prefix=f"{run_id}_averager",
            state_provider=lambda: ({}, []),
            client_mode=True,  # it never serves a state (it has none) and takes part in no round
        )
        # the backups pace themselves (backup_due); only the download, with its progress lines, is the synchroniser's
        self.sync = StateSynchronizer(self.averager, max_backoff=0.0, min_backoff=0.0, prefix=f"backup of {run_id}")

    def maybe_backup(self, step: int) -> Path | None:
        """Back up if :func:`~collab_core.backup.backup_due` says so for the collaboration at ``step``."""
        if not backup_due(step, self.last_step, self.every):
            return None
        served = self.sync.fetch(self.timeout)  # logs why, if it fails
        if served is None:
            logger.warning(f"backup of run {self.run_id!r} at step {step}: no peer served its state; retrying")
            return None
        metadata, tensors = served.metadata, served.tensors
        try:
            backup = make_backup(self.run_id, metadata, list(tensors))
        except ValueError as e:
            logger.warning(f"backup of run {self.run_id!r}: {e}")
            return None
        path = write_backup(self.directory, backup, self.keep)
        self.last_step = backup["step"]
        self.written.append(path)
        logger.info(f"backed up run {self.run_id!r} at step {backup['step']} to {path}")
        return path

    def shutdown(self) -> None:
        """Stop the averager process."""
        if self.averager.is_alive():
            self.averager.shutdown()
