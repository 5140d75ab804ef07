"""Turning a peer's record (calls, all-reduce rounds, probed spans) into per-step figures."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class StepTiming:
    """One collaborative step of one peer, from the end of its previous step to the end of this one."""

    step: int
    end: float
    closing_call: float  # how long the step() call that took the step blocked
    wall: float | None = None  # end minus the previous step's end (None for the first step)
    compute: float = 0.0  # micro-batch compute (with padding) in this window
    allreduce: float = 0.0  # time inside this peer's all-reduce in this window
    group: int = 1  # peers in this step's all-reduce (1: stepped alone)
    micro_batches: int = 0  # this peer's step() calls in the window (4 in W1 when nobody overshoots)
    other_calls: float = 0.0  # time inside the step() calls that did not take the step (e.g. polling the target)
    phases: dict[str, float] = field(default_factory=dict)  # the closing call split by probed spans

    @property
    def waiting(self) -> float:
        """Everything in the window that is neither compute nor all-reduce (DHT, matchmaking, apply, Python)."""
        return max(0.0, (self.wall or 0.0) - self.compute - self.allreduce)


def grad_rounds(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The gradient all-reduces of a peer (raw hivemind's state-averaging rounds excluded), oldest first."""
    rounds = [r for r in record["rounds"] if not r["averager"].endswith("_state_averager")]
    return sorted(rounds, key=lambda r: r["start"])


#: phases contained in others (``dht_read`` happens inside ``target_check``) or the sum itself
NESTED_PHASES = ("total", "dht_read")


def _overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def step_timings(record: dict[str, Any]) -> list[StepTiming]:
    """Every collaborative step a peer took by ``step()`` (a step reached by a state download counts too)."""
    rounds = grad_rounds(record)
    steps: list[StepTiming] = []
    window_start: float | None = None
    compute, other_calls, calls = 0.0, 0.0, 0
    for call in record["calls"]:
        compute += call["t_step"] - call["t0"]
        calls += 1
        if window_start is None:
            window_start = call["t0"]
        if call["after"] <= call["before"]:
            other_calls += call["t1"] - call["t_step"]
            continue
        timing = StepTiming(step=call["after"], end=call["t1"], closing_call=call["t1"] - call["t_step"])
        timing.compute, timing.other_calls, timing.micro_batches = compute, other_calls, calls
        inside = [r for r in rounds if r["ok"] and call["t_step"] - 0.05 <= r["end"] <= call["t1"] + 0.05]
        if inside:
            timing.group = max(r["group"] for r in inside)
        timing.allreduce = sum(_overlap(window_start, call["t1"], r["start"], r["end"]) for r in rounds)
        if steps:
            timing.wall = call["t1"] - steps[-1].end
        timing.phases = call_phases(record, call, inside[-1] if inside else None)
        steps.append(timing)
        window_start, compute, other_calls, calls = call["t1"], 0.0, 0.0, 0
    return steps


def call_phases(record: dict[str, Any], call: dict[str, Any], round_: dict[str, Any] | None) -> dict[str, float]:
    """Split one closing ``step()`` call by the probed spans (our core only; raw hivemind has no probes)."""
    t0, t1 = call["t_step"], call["t1"]
    spans = [s for s in record["spans"] if t0 - 1e-3 <= s[1] and s[2] <= t1 + 1e-3]
    if not spans and round_ is None:
        return {}
    phases: dict[str, float] = {}
    for name, start, end in spans:
        if name != "averager_step":
            phases[name] = phases.get(name, 0.0) + end - start
    if round_ is not None:
        requested = [s[1] for s in spans if s[0] == "averager_step"]
        if requested:
            phases["matchmaking"] = max(0.0, round_["start"] - requested[-1])
        phases["allreduce"] = round_["end"] - round_["start"]
    phases["total"] = t1 - t0
    accounted = sum(v for k, v in phases.items() if k not in NESTED_PHASES)
    phases["other"] = max(0.0, phases["total"] - accounted)
    return phases


def first_shared_step(record: dict[str, Any]) -> StepTiming | None:
    """The first step this peer took in an all-reduce with others."""
    return next((s for s in step_timings(record) if s.group >= 2), None)
