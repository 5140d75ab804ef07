"""What a benchmark peer records: one entry per ``step()`` call, the all-reduce rounds, probed calls, the result."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from bench import probes


@dataclass
class Recorder:
    """Collects a peer's timings and writes them as JSON (``out``) plus its final parameters (``out`` + ``.pt``)."""

    name: str
    side: str
    out: str
    started_at: float = field(default_factory=time.time)
    calls: list[dict[str, Any]] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    spans: list[tuple[str, float, float]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    probe: probes.CallProbe = field(default_factory=probes.CallProbe)

    def call(self, t0: float, t_step: float, t1: float, step_before: int, step_after: int, **info: Any) -> None:
        """One micro-batch: compute from ``t0`` to ``t_step``, the ``step()`` call from ``t_step`` to ``t1``."""
        self.calls.append(dict(t0=t0, t_step=t_step, t1=t1, before=step_before, after=step_after, **info))
        self.rounds.extend(probes.drain_rounds())
        self.spans.extend(self.probe.take())

    def save(self, params: list[torch.Tensor]) -> None:
        """Write the record and the parameters (atomically)."""
        self.rounds.extend(probes.drain_rounds())
        record = dict(
            name=self.name,
            side=self.side,
            started_at=self.started_at,
            calls=self.calls,
            rounds=self.rounds,
            spans=self.spans,
            extra=self.extra,
        )
        torch.save([p.detach().clone() for p in params], self.out + ".pt.tmp")
        os.replace(self.out + ".pt.tmp", self.out + ".pt")
        with open(self.out + ".tmp", "w") as handle:
            json.dump(record, handle)
        os.replace(self.out + ".tmp", self.out)
