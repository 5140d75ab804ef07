"""Summaries of repeated measurements: median with min/max, and ratios of medians."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Summary:
    """Median, min, max and count of a series."""

    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Summary | None:
        """The summary of ``values``; None when empty."""
        if not values:
            return None
        return cls(statistics.median(values), min(values), max(values), len(values))

    def scaled(self, factor: float) -> Summary:
        """The same summary divided by ``factor`` (e.g. by the ideal step time)."""
        return Summary(self.median / factor, self.min / factor, self.max / factor, self.n)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def fmt(summary: Summary | None, unit: str = "", digits: int = 2) -> str:
    """``median [min-max] unit`` (n), or ``-``."""
    if summary is None:
        return "-"
    if summary.n == 1:
        return f"{summary.median:.{digits}f}{unit}"
    few = f" (n={summary.n})" if summary.n < 10 else ""  # below the 10 measured steps: say so
    return f"{summary.median:.{digits}f}{unit} [{summary.min:.{digits}f}-{summary.max:.{digits}f}]{few}"
