"""Time series the dashboard charts: step, peers and samples/s over time, loss against step (bounded memory)."""

from __future__ import annotations

from collections import deque
from typing import Any

from collab_core.monitor.swarm import SwarmState

__all__ = ["History", "MAX_POINTS"]

#: points kept per series (at one read a second: the last 20 minutes)
MAX_POINTS = 1200


class History:
    """What the monitor saw, read after read: ``add`` a state, ``to_json`` for the page.

    Args:
        max_points: points kept per series (oldest dropped first).
    """

    def __init__(self, max_points: int = MAX_POINTS) -> None:
        if max_points < 2:
            raise ValueError(f"max_points must be >= 2, got {max_points}")
        self.started_at: float | None = None
        self.points: deque[tuple[float, int, int, float]] = deque(maxlen=max_points)  # (t, step, peers, rate)
        self.loss: dict[int, float] = {}  # collaborative step -> mean loss of the peers at that step
        self.max_points = max_points

    def add(self, state: SwarmState) -> None:
        """Record one read (failed reads, with ``state.error`` set, are not recorded)."""
        if state.error:
            return
        if self.started_at is None:
            self.started_at = state.time
        self.points.append((state.time - self.started_at, state.step, state.num_peers, state.samples_per_second))
        by_step: dict[int, list[float]] = {}
        for peer in state.peers:
            if peer.loss is not None:
                by_step.setdefault(peer.step, []).append(peer.loss)
        for step, losses in by_step.items():
            self.loss[step] = sum(losses) / len(losses)
        while len(self.loss) > self.max_points:
            del self.loss[min(self.loss)]

    def to_json(self) -> dict[str, Any]:
        """``{"seconds", "step", "peers", "samples_per_second"}`` (lists, one entry per read) and ``"loss"``
        (``[[step, mean loss], ...]``)."""
        return {
            "seconds": [round(p[0], 2) for p in self.points],
            "step": [p[1] for p in self.points],
            "peers": [p[2] for p in self.points],
            "samples_per_second": [round(p[3], 2) for p in self.points],
            "loss": [[step, self.loss[step]] for step in sorted(self.loss)],
        }
