"""Collaboration progress for the user: a tqdm bar and ``accelerator.log`` (main process only).

The metrics (names and meaning in ``collab_core.metrics.METRIC_DESCRIPTIONS``, shared with the Lightning strategy)
are logged after every change of the collaborative step (an update, a skipped overflow step or a state download).
What the bar shows follows the shared rule of ``collab_core.reporting`` (the Lightning strategy uses it too).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from tqdm.auto import tqdm

from collab_core import CollaborativeOptimizer
from collab_core.metrics import METRIC_DESCRIPTIONS, collaboration_metrics
from collab_core.reporting import CollaborationProgress, format_eta, format_rate

METRIC_NAMES = tuple(METRIC_DESCRIPTIONS)


#: the bar is redrawn at most this often (seconds): a person's pace, also in a log file
BAR_REFRESH_SECONDS = 0.5


def bar_frame(
    optimizer_step: int, samples_accumulated: int, target_batch_size: int, taken_undrawn: int | None
) -> tuple[int, int]:
    """What the bar shows: ``(label step, samples)``.

    A step this peer took that no redraw has shown yet is shown full (its label, ``target_batch_size`` samples), so
    that a person sees every completed step fill the bar even when steps come faster than the bar is redrawn (and
    the redraw after it is not due at the call that took it); otherwise the step being built, with the samples the
    collaboration accumulated toward it.

    Args:
        optimizer_step: collaborative steps taken so far.
        samples_accumulated: samples the collaboration accumulated toward the next step.
        target_batch_size: samples per collaborative step.
        taken_undrawn: the latest step taken since the last redraw (``None``: none, or the state was downloaded).
    """
    if taken_undrawn is not None:
        return taken_undrawn, target_batch_size
    return optimizer_step + 1, min(samples_accumulated, target_batch_size)


class ProgressReporter:
    """Shows the collaboration's progress on the main process.

    The bar fills with the samples all peers accumulated toward the collaborative step being built (its label:
    ``collaborative step k`` while ``k - 1`` steps are taken); when the step is taken it shows full, then the next
    one starts. It shows the peers, the collaboration's samples/s over the last seconds of real time and the ETA
    (``collab_core.reporting``: unknown says so), and is redrawn at most every :data:`BAR_REFRESH_SECONDS`. State
    changes (peers joined or left, a state download, a failed round) are logged above it; with ``verbose`` the
    core logs them itself and these lines go to DEBUG.

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
        verbose = getattr(optimizer, "status_loglevel", logging.DEBUG) >= logging.INFO  # INFO: verbose=True
        self.progress = CollaborationProgress(
            str(getattr(optimizer, "prefix", "collab")),
            periodic=False,
            level=logging.DEBUG if verbose else logging.INFO,
        )
        self._bar: Any = None
        self._drawn_at = -math.inf
        self._frame: tuple[int, int] | None = None  # (label step, samples shown) of the latest state
        self._taken_undrawn: int | None = None  # the latest step this peer took that no redraw has shown yet
        self._drawn_frame: tuple[int, int] | None = None
        self._downloads = 0
        if progress_bar:
            self._bar = tqdm(
                total=optimizer.target_batch_size,
                desc=f"collaborative step {optimizer.local_step + 1}",
                dynamic_ncols=True,
                # the bar is the collaboration's progress toward the next step; tqdm's own rate would be meaningless
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} samples [{elapsed}{postfix}]",
            )

    def after_call(self, step_changed: bool) -> None:
        """After a sync-step call: redraw the bar when due; log the metrics if the collaborative step changed."""
        now = time.monotonic()
        due = now - self._drawn_at >= BAR_REFRESH_SECONDS
        if not (step_changed or due):
            return  # the common case: nothing to compute
        state = self.optimizer.collaboration_state
        self.progress.update(state, now)
        downloaded = state.state_downloads != self._downloads
        self._downloads = state.state_downloads
        if downloaded:  # the state jumped: there is no completed step to show
            self._taken_undrawn = None
        elif step_changed:
            self._taken_undrawn = state.optimizer_step
        self._frame = bar_frame(
            state.optimizer_step, state.samples_accumulated, state.target_batch_size, self._taken_undrawn
        )
        if self._bar is not None and due:
            self._draw(now)
            self._taken_undrawn = None
        if step_changed and self.log_metrics and self.accelerator.trackers:
            metrics = collaboration_metrics(self.optimizer, self.progress.latest)
            self.accelerator.log(metrics, step=int(metrics["collab/step"]))

    def _draw(self, now: float, refresh: bool = True) -> None:
        if self._frame is None:
            return
        label, samples = self._frame
        progress = self.progress.latest
        if progress is None:
            return
        full = samples >= progress.target
        peers = f"{progress.peers} peer{'s' if progress.peers != 1 else ''}"
        eta = format_eta(0.0 if full else progress.eta_seconds)
        self._bar.n = samples
        self._bar.set_description_str(f"collaborative step {label}", refresh=False)
        self._bar.set_postfix_str(f"{peers}, {format_rate(progress.samples_per_second)}, ETA {eta}", refresh=False)
        if refresh:
            self._bar.refresh()
        self._drawn_at, self._drawn_frame = now, self._frame

    def close(self) -> None:
        """Draw the latest state (if not shown yet) and close the bar, e.g. before a final summary (idempotent)."""
        if self._bar is None:
            return
        if self._frame != self._drawn_frame:
            now = time.monotonic()
            self.progress.update(self.optimizer.collaboration_state, now)
            self._draw(now, refresh=False)  # close() draws it
        self._bar.close()
        self._bar = None


__all__ = ["BAR_REFRESH_SECONDS", "METRIC_NAMES", "ProgressReporter", "bar_frame", "collaboration_metrics"]
