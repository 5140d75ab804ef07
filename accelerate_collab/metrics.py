"""Collaboration progress for the user: a tqdm bar and ``accelerator.log`` (main process only).

The metrics (names and meaning in ``collab_core.metrics.METRIC_DESCRIPTIONS``, shared with the Lightning strategy)
are logged after every change of the collaborative step (an update, a skipped overflow step or a state download).
"""

from __future__ import annotations

import math
from typing import Any

from tqdm.auto import tqdm

from collab_core import CollaborativeOptimizer
from collab_core.metrics import METRIC_DESCRIPTIONS, collaboration_metrics

METRIC_NAMES = tuple(METRIC_DESCRIPTIONS)


class ProgressReporter:
    """Shows the collaboration's progress on the main process.

    Args:
        accelerator: the user's Accelerator; metrics go to ``accelerator.log`` when it has trackers
            (``accelerator.init_trackers`` was called), with ``step`` = the collaborative step.
        optimizer: the collaborative optimizer whose state is reported.
        progress_bar: show a tqdm bar (samples toward the next collaborative step, peers, samples/s, ETA).
        log_metrics: send the metrics to ``accelerator.log``.
    """

    def __init__(
        self, accelerator: Any, optimizer: CollaborativeOptimizer, *, progress_bar: bool, log_metrics: bool
    ) -> None:
        self.accelerator, self.optimizer, self.log_metrics = accelerator, optimizer, log_metrics
        self._bar: Any = None
        if progress_bar:
            self._bar = tqdm(
                total=optimizer.target_batch_size,
                desc=f"collaborative step {optimizer.local_step}",
                dynamic_ncols=True,
                # the bar is the collaboration's progress toward the next step; tqdm's own rate would be meaningless
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} samples [{elapsed}{postfix}]",
            )

    def after_call(self, step_changed: bool) -> None:
        """Update the bar after a sync-step call; log the metrics if the collaborative step changed."""
        if not (step_changed or self._bar is not None):
            return
        metrics = collaboration_metrics(self.optimizer)
        if self._bar is not None:
            state = self.optimizer.collaboration_state
            self._bar.n = min(state.samples_accumulated, state.target_batch_size)
            self._bar.set_description_str(f"collaborative step {metrics['collab/step']}", refresh=False)
            eta = metrics["collab/eta_seconds"]
            self._bar.set_postfix(
                peers=int(metrics["collab/peers"]),
                samples_per_s=f"{metrics['collab/samples_per_second']:.1f}",
                eta="?" if math.isnan(eta) else f"{eta:.1f}s",
                refresh=False,
            )
            if step_changed:
                self._bar.refresh()
            else:
                self._bar.update(0)  # redraws at most every mininterval
        if step_changed and self.log_metrics and self.accelerator.trackers:
            self.accelerator.log(metrics, step=int(metrics["collab/step"]))

    def close(self) -> None:
        """Close the bar (idempotent)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


__all__ = ["METRIC_NAMES", "ProgressReporter", "collaboration_metrics"]
