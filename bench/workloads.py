"""The workloads W1-W5 of issue 5 and W7 of issue 12 (:mod:`bench.w7`): how each is run and what is reported.

Each ``run_wN`` returns :class:`Row` objects (one per table line) and a dict of raw figures for the JSON file.
Figures are medians over the measured collaborative steps (after ``warmup`` steps), with min/max.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.analysis import StepTiming, first_shared_step, step_timings
from bench.model import max_param_diff
from bench.processes import LOOPBACK, PeerFailed, PeerGroup, wait_for_file
from bench.stats import Summary, fmt
from bench.tcpref import loopback_copy_seconds

IDEAL_W1_STEP = 0.4  # 4 micro-batches of 0.1 s per peer: 2 peers x 4 x 32 = 256 samples
W3_BYTES_PER_PARAM = 4


@dataclass
class Config:
    """What the command line chose."""

    initial_peers: list[str]
    workdir: Path
    measure: int = 10
    warmup: int = 2
    join_after: int = 2
    sides: tuple[str, ...] = ("ours", "raw")
    w3_peers: tuple[int, ...] = (2, 3, 4)
    w3_compression: tuple[str, ...] = ("none", "float16", "uniform8bit")
    w3_params: int = 25_000_000
    w3_measure: int = 10
    w4_peers: tuple[int, ...] = (1, 2, 3, 4)
    w5_rounds: int = 3
    w7_inner_steps: tuple[int, ...] = (8, 32, 128)
    w7_lm_inner_steps: int = 256
    w7_outer_lr: float | None = None  # None: the setting's default (0.7)
    w7_outer_momentum: float | None = None  # None: the setting's default (0.9)
    timeout: float = 300.0


@dataclass
class Row:
    """One line of the table."""

    workload: str
    metric: str
    ours: str
    raw: str = "-"
    ratio: str = "-"
    target: str = "-"
    status: str = "-"


@dataclass
class Result:
    """Rows and raw figures of one workload."""

    rows: list[Row] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


def collab_env(config: Config, run_id: str, peers: int, **settings: Any) -> dict[str, str]:
    """``COLLAB_*`` variables of one measurement (both sides read them).

    The raw side's gradient averager gets ``target_group_size=peers`` (its group then closes as soon as every peer
    is in, instead of waiting out ``matchmaking_time``: 2.1x instead of 3.3x in W1), unless
    ``BENCH_RAW_GROUP_SIZE`` is set (``0``: hivemind's default).
    """
    env = {
        "BENCH_RAW_GROUP_SIZE": os.environ.get("BENCH_RAW_GROUP_SIZE", str(peers)),
        "COLLAB_RUN_ID": run_id,
        "COLLAB_INITIAL_PEERS": " ".join(config.initial_peers),
        "COLLAB_HOST_MADDRS": LOOPBACK,
        "COLLAB_VERBOSE": "1",
        "HIVEMIND_LOGLEVEL": "INFO",
    }
    env.update({f"COLLAB_{key.upper()}": str(value) for key, value in settings.items()})
    return env


#: W1's settings, the same on both sides (tracker refresh 0.1/1.0 s, matchmaking window 1 s)
W1_SETTINGS = dict(
    target_batch_size=256,
    batch_size=32,
    matchmaking_time=1.0,
    min_refresh_period=0.1,
    max_refresh_period=1.0,
    default_refresh_period=0.5,
    averaging_timeout=30.0,
)


def _run_id(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}"


def _measured(steps: list[StepTiming], count: int) -> list[StepTiming]:
    """The last ``count`` steps that have a wall time."""
    return [s for s in steps if s.wall is not None][-count:]


def _status(value: float | None, target: float) -> str:
    if value is None:
        return "error"
    return "pass" if value <= target else "FAIL"


def _ratio(a: Summary | None, b: Summary | None) -> str:
    return f"{a.median / b.median:.2f}" if a is not None and b is not None and b.median > 0 else "-"


# ---------------------------------------------------------------------- W1


def w1_side(config: Config, side: str) -> dict[str, Any]:
    """Two peers of ``side``; the second starts once the first took ``join_after`` steps alone.

    Both stop ``warmup + measure + 1`` steps after the second peer's first shared step (it announces the last step).
    """
    run_id = _run_id(f"w1-{side}")
    workdir = config.workdir / f"w1-{side}"
    mark = workdir / "joined-after.mark"
    common = ["--side", side, "--steps", "-1", "--pad", "0.1", "--run-id", run_id]
    with PeerGroup(workdir, collab_env(config, run_id, 2, **W1_SETTINGS)) as group:
        first = group.start(
            "a",
            [*common, "--index", "0", "--peers", "1", "--finish-peers", "2"]
            + ["--mark-at-step", str(config.join_after), "--mark-file", str(mark)],
        )
        wait_for_file(mark, config.timeout, [first])
        shared = str(config.warmup + config.measure + 1)
        group.start(
            "b", [*common, "--index", "1", "--peers", "0", "--finish-peers", "2", "--stop-after-shared", shared]
        )
        records = group.wait(config.timeout)
    params = [torch.load(Path(str(group.peers[i].out) + ".pt")) for i in range(2)]
    return dict(records=records, param_diff=max_param_diff(params[0], params[1]))


def w1_figures(run: dict[str, Any], measure: int) -> dict[str, Any]:
    """(a)-(d) of one side, plus the timeline and the phase split of the closing call."""
    a, b = run["records"]
    steps_a, steps_b = step_timings(a), step_timings(b)
    measured_a, measured_b = _measured(steps_a, measure), _measured(steps_b, measure)
    wall = Summary.of([s.wall for s in measured_a if s.wall is not None])
    closing = Summary.of([s.closing_call for s in measured_a + measured_b])
    joined = first_shared_step(b)
    join_seconds = Summary.of([joined.end - b["launched_at"]]) if joined is not None else None
    measured = measured_a + measured_b
    phases: dict[str, Any] = {}
    for name in sorted({k for s in measured for k in s.phases}):
        phases[name] = Summary.of([s.phases.get(name, 0.0) for s in measured if s.phases])
    phases["non_closing_step_calls"] = Summary.of([s.other_calls for s in measured])
    phases["compute_per_step"] = Summary.of([s.compute for s in measured])
    phases["micro_batches_per_step"] = Summary.of([float(s.micro_batches) for s in measured])
    return dict(
        step_ratio=wall.scaled(IDEAL_W1_STEP) if wall is not None else None,
        step_seconds=wall,
        closing=closing,
        param_diff=run["param_diff"],
        join_seconds=join_seconds,
        join_breakdown=dict(
            imports=b["started_at"] - b["launched_at"],
            dht_start=b["extra"]["dht_ready_at"] - b["started_at"],
            optimizer_start=b["extra"]["ready_at"] - b["extra"]["dht_ready_at"],
            ready_to_first_shared_step=joined.end - b["extra"]["ready_at"] if joined is not None else None,
        ),
        shared_steps=sum(s.group >= 2 for s in measured_a),
        phases=phases,
        timeline=[
            dict(step=s.step, wall=s.wall, compute=s.compute, allreduce=s.allreduce, waiting=s.waiting, group=s.group)
            for s in steps_a
        ],
        states=[a["extra"].get("state"), b["extra"].get("state")],
        raw_settings=a["extra"].get("raw_settings"),
    )


def run_w1(config: Config) -> Result:
    result = Result()
    figures: dict[str, dict[str, Any]] = {}
    for side in config.sides:
        try:
            figures[side] = w1_figures(w1_side(config, side), config.measure)
        except PeerFailed as e:
            result.data[f"{side}_error"] = str(e)
    result.data.update(figures)
    ours, raw = figures.get("ours", {}), figures.get("raw", {})

    def row(metric: str, key: str, target: float, unit: str, digits: int = 2) -> Row:
        o, r = ours.get(key), raw.get(key)
        status = _status(o.median if o else None, target)
        return Row(
            "W1", metric, fmt(o, unit, digits), fmt(r, unit, digits), _ratio(o, r), f"<= {target:g}{unit}", status
        )

    result.rows += [
        row("(a) step time / 0.4 s", "step_ratio", 1.15, "x"),
        row("(b) closing step() blocks", "closing", 0.1, " s", 3),
        _diff_row(ours.get("param_diff"), raw.get("param_diff")),
        row("(d) 2nd peer start -> 1st shared step", "join_seconds", 3.0, " s"),
    ]
    return result


def _diff_row(ours: float | None, raw: float | None) -> Row:
    text = lambda v: "-" if v is None else f"{v:.1e}"  # noqa: E731
    return Row("W1", "(c) max param diff at end", text(ours), text(raw), "-", "<= 1e-07", _status(ours, 1e-7))


# ---------------------------------------------------------------------- W2, W4: steps per second


def step_series(
    config: Config, tag: str, side: str, peers: int, pad: float, settings: dict[str, Any], extra: list[str] = ()
) -> list[StepTiming]:
    """Start ``peers`` peers of ``side`` together; the measured steps of the first peer.

    A multi-peer run in which the first peer took fewer than ``measure`` shared steps (e.g. a first round lost under
    load, after which the others stepped alone) is run once more; :data:`RETRIES` records each such attempt.
    """
    for attempt in range(2):
        steps = _step_series_once(config, tag, side, peers, pad, settings, extra, attempt)
        shared = sum(s.group >= 2 for s in steps)
        if peers == 1 or side == "plain" or shared >= config.measure or attempt == 1:
            return steps
        RETRIES.append(dict(tag=tag, side=side, peers=peers, shared_steps=shared, measured=len(steps)))
    return steps


#: multi-peer measurements that were repeated because the peers did not collaborate in every measured step
RETRIES: list[dict[str, Any]] = []


def _step_series_once(
    config: Config,
    tag: str,
    side: str,
    peers: int,
    pad: float,
    settings: dict[str, Any],
    extra: list[str],
    attempt: int,
) -> list[StepTiming]:
    total = config.warmup + config.measure + 1
    run_id = _run_id(f"{tag}-{side}-{peers}")
    workdir = config.workdir / f"{tag}-{side}-{peers}" / f"attempt{attempt}"
    with PeerGroup(workdir, collab_env(config, run_id, peers, **settings)) as group:
        for index in range(peers):
            group.start(
                f"p{index}",
                ["--side", side, "--index", str(index), "--steps", str(total), "--pad", str(pad)]
                + ["--peers", str(peers), "--finish-peers", str(peers), "--run-id", run_id, *extra],
            )
        records = group.wait(config.timeout)
    return _measured(step_timings(records[0]), config.measure)


#: W2's two configurations: the project's default tracker settings, and W1's fast refresh (0.1 s)
W2_VARIANTS = {
    "default refresh (0.5 s)": dict(
        W1_SETTINGS, min_refresh_period=0.5, max_refresh_period=30.0, default_refresh_period=3.0
    ),
    "W1 refresh (0.1 s)": W1_SETTINGS,
}


def run_w2(config: Config) -> Result:
    """One peer alone vs a plain PyTorch loop (8 micro-batches of 32, then opt.step()), both padded to 0.1 s."""
    result = Result()
    for variant, settings in W2_VARIANTS.items():
        walls: dict[str, Summary | None] = {}
        for side in ("plain", *config.sides):
            try:
                walls[side] = Summary.of([s.wall for s in step_series(config, "w2", side, 1, 0.1, settings)])
            except PeerFailed as e:
                result.data[f"{variant}: {side}_error"] = str(e)
                walls[side] = None
        plain = walls.get("plain")
        result.data[variant] = {side: s.as_dict() if s else None for side, s in walls.items()}
        ours = walls["ours"].scaled(plain.median) if walls.get("ours") and plain else None
        raw = walls["raw"].scaled(plain.median) if walls.get("raw") and plain else None
        result.rows.append(
            Row(
                "W2",
                f"alone, {variant}: step time / plain loop",
                fmt(ours, "x"),
                fmt(raw, "x"),
                _ratio(ours, raw),
                "<= 1.05x",
                _status(ours.median if ours else None, 1.05),
            )
        )
    return result


def run_w4(config: Config) -> Result:
    """1-4 peers, W1's model without padding: the collaboration's samples per second."""
    result = Result()
    for peers in config.w4_peers:
        rates: dict[str, Summary | None] = {}
        for side in config.sides:
            try:
                walls = [s.wall for s in step_series(config, "w4", side, peers, 0.0, W1_SETTINGS)]
                rates[side] = Summary.of([256 / w for w in walls if w])
            except PeerFailed as e:
                result.data[f"{side}_{peers}_error"] = str(e)
                rates[side] = None
        result.data[str(peers)] = {side: s.as_dict() if s else None for side, s in rates.items()}
        o, r = rates.get("ours"), rates.get("raw")
        result.rows.append(
            Row("W4", f"{peers} peer(s), no padding: samples/s", fmt(o, "", 0), fmt(r, "", 0), _ratio(o, r))
        )
    return result


# ---------------------------------------------------------------------- W3: all-reduce throughput


def run_w3(config: Config) -> Result:
    """All-reduce of ``w3_params`` float32 parameters, no compute, vs a loopback TCP copy of the same bytes."""
    result = Result()
    nbytes = config.w3_params * W3_BYTES_PER_PARAM
    copy = Summary.of([nbytes / s / 1e9 for s in loopback_copy_seconds(nbytes, max(10, config.w3_measure))])
    result.data["tcp_copy_gbps"] = copy.as_dict() if copy else None
    result.rows.append(Row("W3", f"loopback TCP copy of {nbytes / 1e6:.0f} MB: GB/s (reference)", fmt(copy, "", 3)))
    for compression in config.w3_compression:
        for peers in config.w3_peers:
            # every step() call brings the target by itself, so each call is a collaborative step of all peers
            # (no peer spins accumulating 100 MB gradients while it waits for the others)
            settings = dict(
                target_batch_size=256,
                batch_size=256,
                matchmaking_time=5.0,
                averaging_timeout=120.0,
                compression=compression,
            )
            key = f"{compression}-{peers}"
            try:
                w3 = dataclasses.replace(
                    config, measure=config.w3_measure, warmup=min(config.warmup, 1), timeout=3 * config.timeout
                )
                steps = step_series(
                    w3,
                    f"w3-{compression}",
                    "ours",
                    peers,
                    0.0,
                    settings,
                    ["--workload", "allreduce", "--batch-size", "256"],
                )
            except PeerFailed as e:
                result.data[f"{key}_error"] = str(e)
                result.rows.append(Row("W3", f"{peers} peers, {compression}: s/step", "error"))
                continue
            wall = Summary.of([s.wall for s in steps if s.wall])
            allreduce = Summary.of([s.allreduce for s in steps if s.allreduce])
            gbps = Summary.of([nbytes / s.wall / 1e9 for s in steps if s.wall])
            result.data[key] = dict(step=wall, allreduce=allreduce, gbps=gbps)
            ratio = f"{gbps.median / copy.median:.3f}" if gbps and copy else "-"
            result.rows.append(
                Row(
                    "W3",
                    f"{peers} peers, {compression}: s/step (all-reduce s)",
                    f"{fmt(wall, '')} ({fmt(allreduce, '')})",
                )
            )
            result.rows.append(
                Row("W3", f"{peers} peers, {compression}: GB/s (ratio: / TCP copy)", fmt(gbps, "", 3), "-", ratio)
            )
    return result


# ---------------------------------------------------------------------- W5: front-ends


def run_w5(config: Config) -> Result:
    """W1's two peers, started together, through Lightning and through Accelerate vs the core directly (same run).

    The three sides run in turn, ``w5_rounds`` times (core, Lightning, Accelerate, core, ...): the load of a shared
    machine drifts by more than the 5% target between runs a minute apart, so each side's steps are pooled over
    rounds spread across the same period.
    """
    result = Result()
    sides = ("ours", "lightning", "accelerate")
    pooled: dict[str, list[float]] = {side: [] for side in sides}
    for _ in range(max(1, config.w5_rounds)):
        for side in sides:
            if f"{side}_error" in result.data:
                continue
            try:
                series = step_series(config, "w5", side, 2, 0.1, W1_SETTINGS)
                pooled[side].extend(s.wall for s in series if s.wall is not None)
            except PeerFailed as e:
                result.data[f"{side}_error"] = str(e)
    walls = {side: Summary.of(pooled[side]) if pooled[side] else None for side in sides}
    result.data.update({side: s.as_dict() if s else None for side, s in walls.items()})
    result.data["rounds"] = config.w5_rounds
    base = walls.get("ours")
    for side in ("lightning", "accelerate"):
        s = walls.get(side)
        ratio = s.scaled(base.median) if s and base else None
        result.rows.append(
            Row(
                "W5",
                f"{side} step time / core ({fmt(base, ' s')})",
                fmt(ratio, "x"),
                "-",
                "-",
                "<= 1.05x",
                _status(ratio.median if ratio else None, 1.05),
            )
        )
    return result


def run_w7(config: Config) -> Result:
    """W7, DiLoCo against gradient mode (:mod:`bench.w7`)."""
    from bench import w7

    return w7.run_w7(config)


WORKLOADS: dict[str, Callable[[Config], Result]] = {
    "W1": run_w1,
    "W2": run_w2,
    "W3": run_w3,
    "W4": run_w4,
    "W5": run_w5,
    "W7": run_w7,
}
