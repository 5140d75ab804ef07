"""How each side of a comparison builds its optimizer: our core, raw ``hivemind.Optimizer``, or a plain loop.

Every builder returns a :class:`Side`: ``step()`` for one micro-batch, the collaborative step counter, the
parameters, and ``close()``. Settings come from the ``COLLAB_*`` environment the harness sets (the raw side reads
the same variables, so both sides get the same DHT, run id, target and timeouts).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bench.model import make_sgd
from bench.recorder import Recorder


@dataclass
class Side:
    """One side of a comparison, as the training loop sees it."""

    step: Callable[[int], None]
    collaborative_step: Callable[[], int]
    dht: Any
    close: Callable[[], None]
    info: Callable[[], dict[str, Any]]
    after_barrier: Callable[[], None] = lambda: None


def raw_settings() -> dict[str, Any]:
    """The raw side's ``hivemind.Optimizer`` settings (the best found; see bench/README.md)."""
    return dict(
        matchmaking_time=float(os.environ.get("BENCH_RAW_MATCHMAKING_TIME", "1.0")),
        min_refresh_period=float(os.environ.get("BENCH_RAW_MIN_REFRESH", "0.1")),
        max_refresh_period=float(os.environ.get("BENCH_RAW_MAX_REFRESH", "1.0")),
        default_refresh_period=float(os.environ.get("BENCH_RAW_DEFAULT_REFRESH", "0.5")),
        target_group_size=int(os.environ.get("BENCH_RAW_GROUP_SIZE", "0")) or None,
        average_state_every=int(os.environ.get("BENCH_RAW_STATE_EVERY", "1")),
    )


def build_ours(model: torch.nn.Module, recorder: Recorder) -> Side:
    """Our ``CollaborativeOptimizer`` from the ``COLLAB_*`` settings, with timing probes on its step path."""
    from collab_core import CollaborativeOptimizer, CollaborativeSettings, start_dht

    settings = CollaborativeSettings.resolve()
    dht, _hint = start_dht(settings, print_hint=False)
    recorder.extra["dht_ready_at"] = time.time()
    opt = CollaborativeOptimizer(make_sgd(model.parameters()), dht=dht, **settings.optimizer_kwargs())
    probe_core(opt, recorder)

    def close() -> None:
        opt.shutdown()
        dht.shutdown()

    def info() -> dict[str, Any]:
        return dict(opt.collaboration_state.__dict__)

    def after_barrier() -> None:
        opt.tracker.fetch_now(timeout=5)  # see the peers that met at the barrier before the first step

    return Side(lambda n: opt.step(batch_size=n), lambda: opt.local_step, dht, close, info, after_barrier)


def probe_core(opt: Any, recorder: Recorder) -> None:
    """Time the phases of the core's step path (private attributes: a benchmark probe, not an API).

    ``target_check`` is the fresh read (and brief polling) of everyone's progress that decides the step; it contains
    the ``dht_read`` spans. Then ``prepare_round`` (group key and size), the matchmaking request, ``apply``
    (``opt.step()``) and ``finish`` (new step published to the tracker).
    """
    engine = opt.collaboration
    recorder.probe.wrap(opt.tracker, "fetch_now", "dht_read")
    recorder.probe.wrap(engine, "_view_to_act_on", "target_check")
    recorder.probe.wrap(engine.averager, "prepare_round", "prepare_round")
    recorder.probe.wrap(engine.averager, "step", "averager_step")
    recorder.probe.wrap(engine.local, "apply", "apply")
    recorder.probe.wrap(engine, "_finish_step", "finish")


def build_raw(model: torch.nn.Module, recorder: Recorder) -> Side:
    """Raw ``hivemind.Optimizer`` on its own DHT, with the settings of :func:`raw_settings`."""
    import hivemind
    from hivemind.optim.grad_averager import GradientAverager

    from collab_core import CollaborativeSettings

    settings = CollaborativeSettings.resolve()
    raw = raw_settings()
    dht = hivemind.DHT(initial_peers=settings.initial_peers, host_maddrs=settings.host_maddrs, start=True)
    recorder.extra["dht_ready_at"] = time.time()
    factory = None
    if raw["target_group_size"]:
        factory = functools.partial(GradientAverager, target_group_size=raw["target_group_size"])
    opt = hivemind.Optimizer(
        dht=dht,
        run_id=settings.run_id,
        target_batch_size=settings.target_batch_size,
        batch_size_per_step=settings.batch_size,
        optimizer=make_sgd,
        params=model.parameters(),
        matchmaking_time=raw["matchmaking_time"],
        averaging_timeout=settings.averaging_timeout,
        average_state_every=raw["average_state_every"],
        grad_compression=settings.make_compression(),
        grad_averager_factory=factory,
        tracker_opts=dict(
            min_refresh_period=raw["min_refresh_period"],
            max_refresh_period=raw["max_refresh_period"],
            default_refresh_period=raw["default_refresh_period"],
        ),
        verbose=True,
    )
    recorder.extra["raw_settings"] = raw

    def close() -> None:
        opt.shutdown()
        dht.shutdown()

    return Side(lambda n: opt.step(batch_size=n), lambda: opt.local_epoch, dht, close, dict)


def build_plain(model: torch.nn.Module, accumulation: int) -> Side:
    """A plain PyTorch loop: ``opt.step()`` and ``zero_grad()`` every ``accumulation`` micro-batches."""
    opt = make_sgd(model.parameters())
    counters = {"calls": 0, "steps": 0}

    def step(_batch_size: int) -> None:
        counters["calls"] += 1
        if counters["calls"] % accumulation == 0:
            with torch.no_grad():
                for param in model.parameters():
                    if param.grad is not None:
                        param.grad.div_(accumulation)  # the mean over the large batch, as the collaboration takes
            opt.step()
            opt.zero_grad()
            counters["steps"] += 1

    return Side(step, lambda: counters["steps"], None, lambda: None, dict)
