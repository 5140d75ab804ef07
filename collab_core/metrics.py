"""Collaboration metrics with stable names, for the progress bars and loggers of every integration."""

from __future__ import annotations

import math
from typing import Any

from hivemind.utils import get_dht_time

from collab_core.reporting import ProgressSnapshot, eta_seconds, sane_eta

#: metric name -> what it means (the README's metrics table lists the same names)
METRIC_DESCRIPTIONS: dict[str, str] = {
    "collab/step": "collaborative steps (optimizer updates) this peer has taken",
    "collab/peers": "peers in the collaboration, this one included (last view)",
    "collab/samples_accumulated": "samples all peers accumulated toward the next step (last view)",
    "collab/target_batch_size": "samples the collaboration accumulates per step",
    "collab/samples_per_second": "the whole collaboration's throughput (samples/s over the last seconds)",
    "collab/eta_seconds": "estimated seconds until the next collaborative step (NaN while unknown or absurd)",
    "collab/last_round_samples": "samples averaged in this peer's last collaborative step",
    "collab/failed_rounds": "averaging rounds that failed on this peer (not applied)",
    "collab/state_downloads": "times this peer downloaded the collaboration's state",
    "collab/forks_healed": "times this replica was found forked from the others and loaded the kept state",
}
#: throughputs below this (samples/s) are hivemind's placeholder for "not measured yet"
MIN_REPORTED_RATE = 1e-6
#: the subset worth a place in a progress bar
PROGRESS_BAR_METRICS = ("collab/step", "collab/peers", "collab/samples_per_second", "collab/eta_seconds")


def collaboration_metrics(optimizer: Any, progress: ProgressSnapshot | None = None) -> dict[str, float]:
    """The metrics of :data:`METRIC_DESCRIPTIONS` for a ``CollaborativeOptimizer`` (no network access).

    Args:
        optimizer: a ``collab_core.CollaborativeOptimizer`` (running or shut down).
        progress: the display numbers of a :class:`collab_core.reporting.CollaborationProgress` for this optimizer;
            when its rate is known, ``collab/samples_per_second`` and ``collab/eta_seconds`` are that smoothed rate
            and its ETA (what the progress bars show). Otherwise they come from the peers' reports.

    Returns:
        ``{name: value}`` with every name of :data:`METRIC_DESCRIPTIONS`; an ETA that is unknown or absurd (above
        ``collab_core.reporting.MAX_ETA_SECONDS``) is NaN.
    """
    state = optimizer.collaboration_state
    if progress is not None and progress.samples_per_second is not None:
        rate, eta = progress.samples_per_second, progress.eta_seconds
    else:
        # hivemind reports a tiny epsilon rate (and an absurd ETA) until the first speed measurements arrive
        rate = state.samples_per_second if state.samples_per_second >= MIN_REPORTED_RATE else 0.0
        eta = sane_eta(state.eta_next_step - get_dht_time()) if rate > 0 else None
        if eta is None and rate > 0:  # right after a step the view has no estimate yet: extrapolate
            eta = eta_seconds(state.target_batch_size - state.samples_accumulated, rate)
    return {
        "collab/step": float(state.optimizer_step),
        "collab/peers": float(state.num_peers),
        "collab/samples_accumulated": float(state.samples_accumulated),
        "collab/target_batch_size": float(state.target_batch_size),
        "collab/samples_per_second": float(rate),
        "collab/eta_seconds": math.nan if eta is None else float(eta),
        "collab/last_round_samples": float(state.last_round_samples),
        "collab/failed_rounds": float(state.failed_rounds),
        "collab/state_downloads": float(state.state_downloads),
        "collab/forks_healed": float(state.forks_healed),
    }


__all__ = ["METRIC_DESCRIPTIONS", "PROGRESS_BAR_METRICS", "collaboration_metrics"]
