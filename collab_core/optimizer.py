"""CollaborativeOptimizer: many peers accumulate one large batch together, then take the same optimizer step.

How one collaborative step works (``k`` is the number of collaborative steps taken so far):

1. ``step(batch_size)`` adds this micro-batch's gradients to local accumulators and publishes "peer P has ``n``
   samples toward step ``k``" in the DHT (the publishing happens in the tracker's background thread). Nothing on
   this path waits for the network.
2. When the collaboration *may* have reached ``target_batch_size`` (by the last view of everyone's records,
   extrapolated with their reported speed), the optimizer reads the records again, synchronously. It steps only if
   this fresh count reaches the target; if the target is imminent (expected within this peer's own time per
   micro-batch) it polls for it briefly instead of starting another micro-batch.
3. The peers at step ``k`` average their gradients in one hivemind all-reduce, weighted by their sample counts, so
   the result is the mean gradient over every contributing sample. Matchmaking uses a group key that contains ``k``
   (peers at different steps never mix) and closes the group as soon as every peer known to be at step ``k`` is in.
4. Every participant applies the same averaged gradient with ``opt.step()`` and steps the scheduler once.

Failures: a round that fails (timeout, a peer died mid-all-reduce, part of the result missing) changes nothing
locally; the peer keeps its accumulated gradients, counts the failure in ``collaboration_state`` and tries again,
unless other peers have meanwhile taken the step, in which case it downloads their state first. A peer applies only
an all-reduce that completed in full; peers expected in a group that do not come within the matchmaking window are
left out of that step (they download the state afterwards).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import operator
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import TimeoutError as FutureTimeoutError
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.control import AveragingStage, StepControl
from hivemind.dht import DHT
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

from collab_core.accumulator import GradientAccumulator
from collab_core.amp import LossScaleKeeper
from collab_core.averager import CollaborativeAverager
from collab_core.log import get_logger
from collab_core.progress import CollaborationTracker, CollaborationView, PeerRecord
from collab_core.state import IncompleteStateError, capture_state, restore_state

logger = get_logger(__name__)

#: used when ``averaging_timeout=None``: no peer waits longer than this for a dead or stalled groupmate (seconds)
DEFAULT_AVERAGING_TIMEOUT = 30.0
#: how long a group waits for peers that are expected but missing (seconds); ``matchmaking_time`` overrides it
DEFAULT_MATCHMAKING_TIME = 5.0
#: read the progress records when the estimate is within this fraction of the target
ESTIMATE_MARGIN = 0.1
#: how often to re-read progress while waiting for an imminent target (seconds)
TARGET_POLL_INTERVAL = 0.005
#: while a group is forming, check this often whether the other peers already took the step (seconds)
ROUND_POLL_INTERVAL = 0.25

# DecentralizedAverager arguments that the optimizer sets itself
_OWN_AVERAGER_ARGS = {"self", "averaged_tensors", "dht", "start", "prefix", "client_mode"}
_AVERAGER_ARGS = set(inspect.signature(DecentralizedAverager.__init__).parameters) - _OWN_AVERAGER_ARGS
# names from hivemind's former CollaborativeOptimizer / hivemind.Optimizer that mean min_matchmaking_time
_MATCHMAKING_TIME_ALIASES = ("averaging_expiration", "matchmaking_time")


@dataclass(frozen=True)
class CollaborationState:
    """What this peer knows about the collaboration (``CollaborativeOptimizer.collaboration_state``).

    Attributes:
        optimizer_step: collaborative steps this peer has taken (same as ``local_step``).
        global_step: the newest collaborative step announced by any peer.
        samples_accumulated: samples accumulated toward this peer's next step, collaboration-wide (last view).
        target_batch_size: samples the collaboration accumulates per step.
        num_peers: peers seen in the last view (this one included).
        num_clients: how many of them run in client mode.
        eta_next_step: estimated wall-clock time (DHT time) of the next collaborative step.
        next_fetch_time: when the background tracker reads the collaboration's progress again (DHT time).
        failed_rounds: averaging rounds that failed on this peer (it did not apply them).
        state_downloads: times this peer downloaded the state from peers.
        overflow_steps: collaborative steps skipped because some peer's fp16 gradients had inf/NaN.
        nonfinite_steps: collaborative steps skipped because the averaged gradient had inf/NaN although no peer
            flagged an fp16 overflow (e.g. a faulty or malicious peer sent inf/NaN gradients).
        short_rounds: rounds (counted in ``failed_rounds`` too) not applied because the group gathered fewer than
            ``target_batch_size`` samples (expected peers did not come, or a record overstated a peer's samples).
        last_round_peers: peers that took part in this peer's last collaborative step.
        last_round_samples: samples averaged in that step.
        last_round_participants: DHT peer ids (base58) of those peers, this one included.
        last_round_contributions: samples each of those peers contributed to that step, by DHT peer id (base58);
            summing them over steps gives a leaderboard of contributions.
        samples_per_second: the whole collaboration's throughput, by the peers' reports (last view).
    """

    optimizer_step: int
    global_step: int
    samples_accumulated: int
    target_batch_size: int
    num_peers: int
    num_clients: int
    eta_next_step: float
    next_fetch_time: float
    failed_rounds: int
    state_downloads: int
    overflow_steps: int
    last_round_peers: int
    last_round_samples: int
    last_round_participants: tuple[str, ...] = ()
    samples_per_second: float = 0.0
    nonfinite_steps: int = 0
    short_rounds: int = 0
    last_round_contributions: dict[str, int] = field(default_factory=dict)


def _all_finite(tensors: Iterator[torch.Tensor | None]) -> bool:
    """Whether every given tensor (``None`` counts as finite) holds only finite values."""
    return all(tensor is None or bool(torch.isfinite(tensor).all()) for tensor in tensors)


def _sample_count(info: Any) -> int:
    """The sample count a groupmate reported in the round's gathered data (0 if missing or malformed)."""
    samples = info.get("samples") if isinstance(info, dict) else None
    return samples if isinstance(samples, int) and not isinstance(samples, bool) and samples > 0 else 0


def _positive_number(name: str, value: Any, *, integer: bool = False, allow_zero: bool = False) -> Any:
    valid_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if (
        isinstance(value, bool)
        or not valid_type
        or not math.isfinite(value)
        or value < 0
        or (value == 0 and not allow_zero)
    ):
        kind = "integer" if integer else "number"
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite {kind} {bound}, got {value!r}")
    return value


class CollaborativeOptimizer(torch.optim.Optimizer):
    """An optimizer that updates the model once all peers together accumulated ``target_batch_size`` samples.

    It wraps a regular PyTorch optimizer. Unlike a regular optimizer:

    * ``step()`` is called once per micro-batch, after ``backward()``; it accumulates and returns, and only when the
      collaboration reached the target does it average gradients with the other peers and call ``opt.step()``;
    * after accumulating, ``step()`` clears ``param.grad`` (so forgetting ``zero_grad`` is harmless), except with
      ``reuse_grad_buffers=True``, where ``param.grad`` *is* the accumulator and must not be zeroed by the user.

    Args:
        opt: a standard PyTorch optimizer over the model's parameters (large-batch ones such as LAMB/LARS suit best).
        dht: a running ``hivemind.DHT`` connected to the other peers (see ``collab_core.start_dht``).
        prefix: the run's name in the DHT; all peers of one run use the same prefix (letters, digits, ``_``, ``-``).
        target_batch_size: take an optimizer step after all peers together accumulated this many samples.
        batch_size_per_step: samples per ``step()`` call when ``step`` is called without ``batch_size``.
        scheduler: a learning-rate scheduler stepped exactly once per collaborative step, in sync on every peer;
            pass it here rather than stepping it yourself.
        min_refresh_period: read the collaboration's progress at most this often (seconds).
        max_refresh_period: read the collaboration's progress at least this often (seconds).
        default_refresh_period: read it this often while no other peers are seen (seconds).
        expected_drift_peers: assume this many peers may join between steps (makes refreshes more frequent).
        expected_drift_rate: assume this fraction of the collaboration may join or leave between steps.
        performance_ema_alpha: smoothing of this peer's samples-per-second estimate.
        metadata_expiration: this peer's progress record lives this long in the DHT unless refreshed (seconds).
        averaging_timeout: give up on an all-reduce after this many seconds (e.g. a groupmate died); ``None``
            means ``DEFAULT_AVERAGING_TIMEOUT`` (30 s).
        step_tolerance: a peer that is this many steps behind the collaboration is still deemed synchronized and
            keeps training; further behind, it downloads the state from peers at its next ``step()``. A peer never
            averages with peers at another step: if others are still ahead when its own step comes, it downloads.
        reuse_grad_buffers: accumulate gradients in ``param.grad`` (saves memory). Then do NOT call ``zero_grad``
            (``CollaborativeOptimizer.zero_grad`` is a no-op and warns; wiping ``.grad`` otherwise raises at the next
            ``step``); micro-batches are weighted equally, which is exact when they all have the same size.
        accumulate_grads_on: accumulate gradients on this device (e.g. ``torch.device("cpu")`` to save accelerator
            memory); default: the parameters' device. Cannot be combined with ``reuse_grad_buffers``.
        client_mode: accept no incoming connections (behind NAT/firewall); the peer still contributes gradients
            through peers that do accept connections. Start the DHT in client mode as well (``start_dht`` does).
        grad_scaler: the ``torch.amp.GradScaler`` that scales the loss (fp16 mixed precision). ``param.grad`` then
            holds scaled gradients; the optimizer unscales this peer's accumulated gradient once per collaborative
            step, and if any peer of the round found inf/NaN, every peer skips the update (the step still counts)
            and the scale backs off; it grows after ``growth_interval`` clean steps. Do not call the scaler's
            ``step``/``unscale_``/``update`` yourself: the scale must stay constant between collaborative steps.
        verbose: log collaboration progress at INFO level instead of DEBUG.
        **kwargs: passed to hivemind's averager that runs the all-reduce, e.g. ``compression``, ``bandwidth``,
            ``min_matchmaking_time`` (alias ``averaging_expiration`` or ``matchmaking_time``: how long a group waits
            for expected peers that are missing, default 5 s; keep it above the slowest peer's time per
            micro-batch, or slow peers miss steps and download the state), ``target_group_size`` (caps the group
            size; smaller than the collaboration means peers no longer hold identical parameters),
            ``request_timeout``.

    Raises:
        ValueError: for invalid arguments (the message names the argument and the fix).
        TypeError: for unknown keyword arguments.
    """

    def __init__(
        self,
        opt: torch.optim.Optimizer,
        *,
        dht: DHT,
        prefix: str,
        target_batch_size: int,
        batch_size_per_step: int | None = None,
        scheduler: Any | None = None,
        min_refresh_period: float = 0.5,
        max_refresh_period: float = 30,
        default_refresh_period: float = 3,
        expected_drift_peers: float = 3,
        expected_drift_rate: float = 0.2,
        performance_ema_alpha: float = 0.1,
        metadata_expiration: float = 60.0,
        averaging_timeout: float | None = None,
        step_tolerance: int = 1,
        reuse_grad_buffers: bool = False,
        accumulate_grads_on: torch.device | None = None,
        client_mode: bool = False,
        grad_scaler: Any | None = None,
        verbose: bool = False,
        **kwargs: Any,
    ):
        self._validate_arguments(
            opt,
            dht,
            prefix,
            target_batch_size,
            batch_size_per_step,
            step_tolerance,
            reuse_grad_buffers,
            accumulate_grads_on,
            averaging_timeout,
        )
        for name, value in dict(
            min_refresh_period=min_refresh_period,
            max_refresh_period=max_refresh_period,
            default_refresh_period=default_refresh_period,
            metadata_expiration=metadata_expiration,
        ).items():
            _positive_number(name, value)
        if min_refresh_period > max_refresh_period:
            raise ValueError(
                f"min_refresh_period ({min_refresh_period}) must not exceed max_refresh_period ({max_refresh_period})"
            )
        averager_kwargs = self._averager_kwargs(kwargs)
        round_timeout = DEFAULT_AVERAGING_TIMEOUT if averaging_timeout is None else float(averaging_timeout)
        averager_kwargs.setdefault("allreduce_timeout", round_timeout)
        # hivemind uses next_chunk_timeout as the per-chunk timeout of state downloads (and of all-reduce senders);
        # a serving peer answers after its current step, which may take a matchmaking window plus an all-reduce
        averager_kwargs.setdefault(
            "next_chunk_timeout",
            averager_kwargs["min_matchmaking_time"] + round_timeout + 2 * averager_kwargs["request_timeout"],
        )

        self.opt, self.scheduler, self.dht, self.prefix = opt, scheduler, dht, prefix
        self.target_batch_size, self.batch_size_per_step = target_batch_size, batch_size_per_step
        self.step_tolerance = step_tolerance
        self.averaging_timeout = round_timeout
        self._download_timeout = averager_kwargs["next_chunk_timeout"] + round_timeout
        self.matchmaking_time = float(averager_kwargs["min_matchmaking_time"])
        self.request_timeout = float(averager_kwargs["request_timeout"])
        self.reuse_grad_buffers = reuse_grad_buffers
        self.grad_scaler = grad_scaler
        self._loss_scale = LossScaleKeeper(grad_scaler) if grad_scaler is not None else None
        self.status_loglevel = logging.INFO if verbose else logging.DEBUG
        self.local_step = 0

        if client_mode and not dht.client_mode:
            logger.warning(
                "client_mode=True, but the DHT accepts incoming connections: start it with client_mode=True "
                "(collab_core.start_dht does this from the settings) to accept no incoming connections at all"
            )
        self.client_mode = bool(client_mode or dht.client_mode)

        self._group_size_cap: int | None = averager_kwargs.pop("target_group_size", None)
        self._state_lock = threading.RLock()
        self._shutdown_done = False
        self._zero_grad_warned = False
        self._missed_step = False
        self._failed_rounds = 0
        self._state_downloads = 0
        self._overflow_steps = 0
        self._nonfinite_steps = 0
        self._short_rounds = 0
        self._download_backoff = 0.0  # seconds to wait after the last failed automatic download (doubles, capped)
        # records that claimed to be ahead when no peer could serve a newer state (e.g. forged records): peer id ->
        # record time. They are not believed again until that peer publishes a newer record.
        self._unbacked_claims: dict[bytes, float] = {}
        self._next_download_at = 0.0  # time.monotonic() before which no automatic download is tried
        self._max_backoff = float(metadata_expiration)  # by then, records of crashed peers have expired
        self.last_step_overflowed = False  # the last collaborative step was skipped for inf/NaN (fp16) gradients
        #: what the optimizer is doing, for progress displays: "accumulating", "averaging", "downloading", "stopped"
        self.activity = "accumulating"
        self._last_round: dict[bytes, dict[str, int]] = {}  # peer id -> {"step", "samples"} of the last step
        self._absent_peers: dict[bytes, float] = {}  # expected in a round but never came: peer id -> record time
        self._round_mates: dict[bytes, float] = {}  # peers of this peer's last step -> when it was taken (DHT time)
        self._reached_step_at: float | None = None  # when this peer reached its current step (None: never stepped)
        self._last_round_reached: int | None = None  # the step that this peer's last round led to
        # a round that failed here after its all-reduce began: (step, expected peers, failure time in DHT time). Some
        # of its peers may have applied it; see _round_may_be_retried
        self._unsettled_round: tuple[int, frozenset[bytes], float] | None = None
        self._last_step_call: float | None = None
        self._seconds_per_call = 0.0  # moving average of the time between step() calls (this peer's micro-batch)

        self._params = [param for group in opt.param_groups for param in group["params"]]
        self._accumulator = GradientAccumulator(
            self._params, reuse_grad_buffers=reuse_grad_buffers, accumulate_grads_on=accumulate_grads_on
        )
        self._prepare_optimizer()
        self._averager = CollaborativeAverager(
            self._make_averaged_tensors(),
            dht,
            prefix=f"{prefix}_averager",
            state_provider=self._shared_state,
            client_mode=self.client_mode,
            **averager_kwargs,
        )
        try:
            self.tracker = CollaborationTracker(
                dht,
                prefix,
                target_batch_size,
                client_mode=self.client_mode,
                min_refresh_period=min_refresh_period,
                max_refresh_period=max_refresh_period,
                default_refresh_period=default_refresh_period,
                expected_drift_peers=expected_drift_peers,
                expected_drift_rate=expected_drift_rate,
                performance_ema_alpha=performance_ema_alpha,
                metadata_expiration=metadata_expiration,
                status_loglevel=self.status_loglevel,
                start=True,
            )
        except BaseException:
            self._averager.shutdown()
            raise
        self._announce()

    # ------------------------------------------------------------------ validation and construction

    @staticmethod
    def _validate_arguments(
        opt: Any,
        dht: Any,
        prefix: Any,
        target_batch_size: Any,
        batch_size_per_step: Any,
        step_tolerance: Any,
        reuse_grad_buffers: bool,
        accumulate_grads_on: Any,
        averaging_timeout: Any,
    ) -> None:
        if not isinstance(opt, torch.optim.Optimizer):
            raise ValueError(f"opt must be a torch.optim.Optimizer, got {type(opt).__name__}")
        if not any(group["params"] for group in opt.param_groups):
            raise ValueError("opt has no parameters: create it from model.parameters() of the model you train")
        if not isinstance(dht, DHT):
            raise ValueError(f"dht must be a running hivemind.DHT, got {type(dht).__name__}")
        if not dht.is_alive():
            raise ValueError(
                "dht is not running: create it with hivemind.DHT(..., start=True) or collab_core.start_dht(settings)"
            )
        if not isinstance(prefix, str) or not prefix or not all(c.isalnum() or c in "_-" for c in prefix):
            raise ValueError(f"prefix must be a non-empty run name of letters, digits, '_' and '-', got {prefix!r}")
        _positive_number("target_batch_size", target_batch_size, integer=True)
        if batch_size_per_step is not None:
            _positive_number("batch_size_per_step", batch_size_per_step, integer=True)
        _positive_number("step_tolerance", step_tolerance, integer=True, allow_zero=True)
        if averaging_timeout is not None:
            _positive_number("averaging_timeout", averaging_timeout)
        if reuse_grad_buffers and accumulate_grads_on is not None:
            raise ValueError(
                "reuse_grad_buffers=True accumulates in param.grad, so accumulate_grads_on has no effect: "
                "set accumulate_grads_on=None, or reuse_grad_buffers=False to accumulate on another device"
            )

    def _averager_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs = dict(kwargs)
        for alias in _MATCHMAKING_TIME_ALIASES:
            if alias in kwargs:
                value = kwargs.pop(alias)
                if value is not None:
                    kwargs.setdefault("min_matchmaking_time", value)
        unknown = sorted(set(kwargs) - _AVERAGER_ARGS)
        if unknown:
            raise TypeError(
                f"unknown argument(s) {unknown} for CollaborativeOptimizer; extra keyword arguments go to hivemind's "
                f"averager, which accepts: {sorted(_AVERAGER_ARGS | set(_MATCHMAKING_TIME_ALIASES))}"
            )
        matchmaking_time = _positive_number(
            "min_matchmaking_time", kwargs.get("min_matchmaking_time", DEFAULT_MATCHMAKING_TIME)
        )
        kwargs["min_matchmaking_time"] = matchmaking_time
        # hivemind warns (and may deadlock) unless request_timeout < min_matchmaking_time
        kwargs.setdefault("request_timeout", min(3.0, matchmaking_time / 2))
        if kwargs.get("target_group_size") is not None:
            _positive_number("target_group_size", kwargs["target_group_size"], integer=True)
        return kwargs

    def _prepare_optimizer(self) -> None:
        """Hook for subclasses that need the optimizer state to exist before averaging starts."""

    def _make_averaged_tensors(self) -> list[torch.Tensor]:
        """Host-memory buffers that each round averages: one gradient per parameter (+ the overflow flag with fp16)."""
        buffers = [torch.zeros_like(param, device="cpu") for param in self._params]
        if self._scaling_loss:
            buffers.append(torch.zeros(1))  # weighted mean > 0 iff some peer of the round overflowed
        return buffers

    @property
    def _scaling_loss(self) -> bool:
        return self._loss_scale is not None and self._loss_scale.enabled

    # ------------------------------------------------------------------ torch.optim.Optimizer pass-through

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The wrapped optimizer's parameter groups."""
        return self.opt.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.opt.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        """The wrapped optimizer's per-parameter state."""
        return self.opt.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped optimizer's defaults."""
        return self.opt.defaults

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Not supported: every peer must average the same tensors, fixed when the optimizer is created."""
        raise NotImplementedError("add parameter groups to the wrapped optimizer before creating the collaboration")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(prefix={self.prefix!r}, local_step={self.local_step}, opt={self.opt!r})"

    # ------------------------------------------------------------------ public API

    @property
    def is_synchronized(self) -> bool:
        """Whether this peer is at most ``step_tolerance`` collaborative steps behind the collaboration."""
        return self.local_step >= self.tracker.view.epoch - self.step_tolerance

    @property
    def collaboration_state(self) -> CollaborationState:
        """This peer's view of the collaboration (see :class:`CollaborationState`)."""
        view = self.tracker.view
        contributions = {PeerID(peer_id).to_base58(): _sample_count(info) for peer_id, info in self._last_round.items()}
        return CollaborationState(
            optimizer_step=self.local_step,
            global_step=view.epoch,
            samples_accumulated=self._samples_toward_next_step(view),
            target_batch_size=self.target_batch_size,
            num_peers=view.num_peers,
            num_clients=view.num_clients,
            eta_next_step=view.eta_next_epoch,
            next_fetch_time=view.next_fetch_time,
            failed_rounds=self._failed_rounds,
            state_downloads=self._state_downloads,
            overflow_steps=self._overflow_steps,
            last_round_peers=len(self._last_round),
            last_round_samples=sum(contributions.values()),
            last_round_participants=tuple(contributions),
            last_round_contributions=contributions,
            samples_per_second=float(view.samples_per_second),
            nonfinite_steps=self._nonfinite_steps,
            short_rounds=self._short_rounds,
        )

    def step(  # type: ignore[override]  # the reference API takes batch_size first
        self, batch_size: int | None = None, closure: Callable[[], Any] | None = None, **kwargs: Any
    ) -> Any:
        """Report ``batch_size`` more samples (whose gradients are in ``param.grad``); update when the target is met.

        Call it once per micro-batch, after ``loss.backward()``.

        Args:
            batch_size: samples in this micro-batch; defaults to ``batch_size_per_step``.
            closure: optional, as in ``torch.optim.Optimizer.step``: called first to compute the loss and gradients.
            **kwargs: accepted for compatibility with hivemind's former optimizer; must be empty.

        Returns:
            The closure's loss, if a closure was given.

        Raises:
            ValueError: if the batch size is missing, not a positive integer, or the optimizer was shut down.
        """
        if kwargs:
            raise TypeError(f"unexpected argument(s) to step(): {sorted(kwargs)}")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        batch_size = self._resolve_batch_size(batch_size)
        if self._shutdown_done:
            raise ValueError("this CollaborativeOptimizer was shut down; create a new one to keep training")
        self._measure_call_interval()

        if self._steps_behind() > self.step_tolerance and self._may_download():
            logger.log(self.status_loglevel, f"{self.prefix}: behind the collaboration, downloading its state")
            self._discard_current_gradients()
            self._catch_up()
            return loss

        self._accumulator.add(batch_size)
        now, background_view = get_dht_time(), self.tracker.view
        # by the last view, may the target be reached before this peer finishes its next micro-batch? (with a margin
        # for the others' speed estimates, which are only moving averages)
        near_target = (
            self._estimated_samples(background_view, now + self._seconds_per_call)
            >= (1 - ESTIMATE_MARGIN) * self.target_batch_size
        )
        # others read this peer's record to decide when to step: publish every micro-batch near the target, and at
        # most every min_refresh_period otherwise (each publication is a DHT store)
        publish = near_target or now - self.tracker.last_published >= self.tracker.min_refresh_period
        self.tracker.report_local_progress(self.local_step, self._accumulator.samples, publish=publish)
        if background_view.num_peers <= 1 and now - background_view.fetched_at >= self.tracker.min_refresh_period:
            self.tracker.request_refresh()  # alone so far: look for newcomers often, in the background
        if near_target:
            view = self._view_if_target_reached()
            if view is not None:
                self._collaborative_step(view)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear ``param.grad`` (``step`` already does this after accumulating).

        With ``reuse_grad_buffers=True`` this is a no-op with a warning: ``param.grad`` holds the accumulated
        gradients of samples that are already counted toward the collaboration's target.
        """
        if self.reuse_grad_buffers:
            if not self._zero_grad_warned:
                logger.warning(
                    "zero_grad() ignored: with reuse_grad_buffers=True, param.grad accumulates the gradients of "
                    "samples already reported to the collaboration; they are cleared after each collaborative step"
                )
                self._zero_grad_warned = True
            return
        self.opt.zero_grad(set_to_none=set_to_none)

    def wait_for_peers(self, num_peers: int, timeout: float) -> int:
        """Block until the collaboration has at least ``num_peers`` peers (this one included), e.g. before training.

        Args:
            num_peers: how many peers to wait for.
            timeout: give up after this many seconds.

        Returns:
            The number of peers seen.

        Raises:
            TimeoutError: if fewer peers were seen when ``timeout`` ran out (the message says how many).
        """
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            try:
                seen = self.tracker.fetch_now(timeout=self.request_timeout).num_peers
            except Exception as e:  # the DHT did not answer this time: try again until the deadline
                logger.debug(f"{self.prefix}: could not read the collaboration's progress: {e!r}")
            if seen >= num_peers:
                return seen
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{self.prefix}: waited {timeout:.0f}s for {num_peers} peers, saw {seen}; start the other peers "
                    "with this peer's join hint (COLLAB_INITIAL_PEERS), or wait for fewer peers"
                )
            time.sleep(ROUND_POLL_INTERVAL)

    def load_state_from_peers(self, **kwargs: Any) -> bool:
        """Download parameters, optimizer state, scheduler state and step counter from another peer.

        Locally accumulated gradients are discarded (they were computed for the old parameters).

        Args:
            **kwargs: ``timeout`` (seconds; default: long enough for the serving peer to finish its current step).

        Returns:
            True if a state was downloaded, False if no peer could provide one.
        """
        timeout = kwargs.pop("timeout", None)
        timeout = self._download_timeout if timeout is None else timeout
        if kwargs:
            raise TypeError(f"unexpected argument(s) to load_state_from_peers(): {sorted(kwargs)}")
        return self._load_state(timeout, require_newer=False)

    def _catch_up(self) -> bool:
        """The automatic download when peers seem ahead: only a state newer than this peer's is loaded.

        A record claiming a step that no peer can serve (e.g. a forged progress record) must not make this peer
        reload its own step again and again, discarding its gradients each time: such a download counts as failed
        and backs off, and the peer keeps training meanwhile.
        """
        return self._load_state(self._download_timeout, require_newer=True)

    def _load_state(self, timeout: float, require_newer: bool) -> bool:
        try:
            with self._doing("downloading"):
                downloaded = self._averager.load_state_from_peers(timeout=timeout)
        except Exception as e:
            logger.warning(f"{self.prefix}: could not download the state from peers: {e!r}")
            downloaded = None
        if downloaded is None:
            self._download_failed("no peer could provide its state")
            return False
        metadata, tensors = downloaded
        served_step = metadata.get("step") if isinstance(metadata, dict) else None
        if isinstance(served_step, int) and served_step < self.local_step:
            self._distrust_claims_ahead()
            self._download_failed(
                f"the only state available is older (step {metadata['step']}) than this peer's (step {self.local_step})"
            )
            return False
        if require_newer and served_step == self.local_step:
            self._distrust_claims_ahead()
            self._download_failed(
                f"peers seem to be ahead, but the state they serve is at this peer's own step {self.local_step}"
            )
            return False
        with self._state_lock:  # parameters and step change together for peers downloading from this one
            try:
                step = restore_state(self.opt, self.scheduler, metadata, tensors)
            except IncompleteStateError as e:  # checked before anything is loaded: the local state is untouched
                self._download_failed(f"{e} (the serving peer stopped mid-transfer); nothing was loaded")
                return False
            except (ValueError, KeyError, TypeError) as e:
                raise RuntimeError(f"{self.prefix}: the state downloaded from a peer cannot be loaded: {e}") from e
            self._set_local_step(step)
        self._state_downloads += 1
        self._download_backoff, self._next_download_at = 0.0, 0.0
        self._last_round_reached = None
        # peers last seen one step earlier most likely produced this state and are at `step` too: count them in the
        # next group until their records catch up (as after a step taken together)
        now = self._reached_step_at = get_dht_time()
        self._round_mates = {peer.peer_id: now for peer in self.tracker.view.peers_at(step - 1)}
        self._announce()
        logger.log(self.status_loglevel, f"{self.prefix}: downloaded the collaboration's state at step {step}")
        return True

    def _distrust_claims_ahead(self) -> None:
        """No peer serves a state newer than this peer's: the records that claim to be ahead are not backed."""
        view = self.tracker.view
        present = {peer.peer_id for peer in view.peers}
        self._unbacked_claims = {peer_id: t for peer_id, t in self._unbacked_claims.items() if peer_id in present}
        for peer in view.peers_ahead_of(self.local_step):
            self._unbacked_claims[peer.peer_id] = peer.time

    def _peers_ahead(self, view: CollaborationView, step: int) -> list[PeerRecord]:
        """Peers ahead of ``step`` (able to share state), except records already found not to be backed by a state."""
        return [
            peer
            for peer in view.peers_ahead_of(step)
            if peer.peer_id not in self._unbacked_claims or peer.time > self._unbacked_claims[peer.peer_id]
        ]

    def _steps_behind(self) -> int:
        """How many steps the most advanced credible peer is ahead of this one (0 if none is)."""
        ahead = self._peers_ahead(self.tracker.view, self.local_step)
        return max((peer.step for peer in ahead), default=self.local_step) - self.local_step

    def _may_download(self) -> bool:
        """Whether an automatic state download may be tried now (after a failed one, attempts back off)."""
        return time.monotonic() >= self._next_download_at

    def _download_failed(self, reason: str) -> None:
        # Without a back-off, a peer whose view shows peers ahead (e.g. records of crashed peers, which live until
        # they expire) would retry at every step() and discard every micro-batch meanwhile.
        self._download_backoff = min(max(2 * self._download_backoff, self.matchmaking_time), self._max_backoff)
        self._next_download_at = time.monotonic() + self._download_backoff
        logger.warning(
            f"{self.prefix}: {reason}; continuing from the local state, next automatic download attempt in "
            f"{self._download_backoff:.0f}s"
        )

    def state_dict(self) -> dict[str, Any]:
        """A checkpoint: the wrapped optimizer's and scheduler's state dicts and the collaborative step.

        Works after :meth:`shutdown` too (e.g. to save a checkpoint once training has finished).
        """
        with self._state_lock:
            return {
                "optimizer": self.opt.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "local_step": self.local_step,
            }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a checkpoint made by :meth:`state_dict` (a plain optimizer state dict is accepted as well)."""
        if "local_step" not in state_dict:
            with self._state_lock:
                self.opt.load_state_dict(state_dict)
            return
        with self._state_lock:
            self.opt.load_state_dict(state_dict["optimizer"])
            if self.scheduler is not None and state_dict.get("scheduler") is not None:
                self.scheduler.load_state_dict(state_dict["scheduler"])
            self._set_local_step(int(state_dict["local_step"]))
            self._last_round_reached = None
        if not self._shutdown_done:
            self._announce()  # others must see this peer at its restored step, not at the one it was created at

    def shutdown(self) -> None:
        """Leave the collaboration: withdraw this peer's progress record and stop the averager. Idempotent."""
        if self._shutdown_done:
            return
        self._shutdown_done = True
        try:
            self._wait_for_round_mates()
        finally:
            self.activity = "stopped"
        try:
            self.tracker.shutdown(timeout=self.request_timeout)
        finally:
            if self._averager.is_alive():
                self._averager.shutdown()

    def _wait_for_round_mates(self) -> None:
        """Before leaving, stay until the peers of this peer's last step have taken it too (bounded).

        hivemind's all-reduce returns on a peer as soon as *it* has every averaged part; the parts it reduced for
        its groupmates may still be on their way. A peer that shut its averager down right after its last step could
        cut that delivery: a groupmate's round then failed, and it took the step again without this peer, from other
        gradients, so the replicas differed. Waiting here lets the delivery finish, and a groupmate whose round failed
        anyway finds this peer ahead and downloads its state (this peer still serves it while waiting). Mates that
        left or reached this step end the wait; it never lasts longer than one more round after the step.
        """
        local_id = self.tracker.view.local_peer_id
        mates = {peer_id for peer_id in self._last_round if peer_id != local_id}
        if not mates or self._last_round_reached != self.local_step or not self._averager.is_alive():
            return  # no groupmates, or this peer's state has changed since that round (download, checkpoint)
        stepped_at = self._reached_step_at if self._reached_step_at is not None else get_dht_time()
        deadline = stepped_at + self.matchmaking_time + self.averaging_timeout + 2 * self.request_timeout
        self.activity = "leaving"
        while get_dht_time() < deadline:
            try:
                view = self.tracker.fetch_now(timeout=self.request_timeout)
            except Exception as e:  # the DHT did not answer: try again until the deadline
                logger.debug(f"{self.prefix}: could not read the collaboration's progress: {e!r}")
                continue
            if not any(peer.peer_id in mates and peer.step < self.local_step for peer in view.peers):
                return
            time.sleep(ROUND_POLL_INTERVAL)
        logger.warning(f"{self.prefix}: leaving while peers of step {self.local_step - 1} have not taken it yet")

    def __del__(self) -> None:
        try:
            if not getattr(self, "_shutdown_done", True):
                self.shutdown()
        except Exception:  # noqa: S110 - interpreter shutdown: nothing useful left to do
            pass

    # ------------------------------------------------------------------ the collaborative step

    def _resolve_batch_size(self, batch_size: Any) -> int:
        if batch_size is None:
            batch_size = self.batch_size_per_step
        if batch_size is None:
            raise ValueError(
                "batch_size is required: call step(batch_size=<samples in this micro-batch>) or create the "
                "optimizer with batch_size_per_step=<samples per step() call>"
            )
        if isinstance(batch_size, bool):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(batch_size, float):
            if not math.isfinite(batch_size) or batch_size != int(batch_size):
                raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
            batch_size = int(batch_size)
        try:
            batch_size = operator.index(batch_size)
        except TypeError:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}") from None
        if batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        return batch_size

    def _measure_call_interval(self) -> None:
        now = time.perf_counter()
        if self._last_step_call is not None:
            interval = now - self._last_step_call
            alpha = 0.3 if self._seconds_per_call else 1.0
            self._seconds_per_call = alpha * interval + (1 - alpha) * self._seconds_per_call
        self._last_step_call = now

    def _discard_current_gradients(self) -> None:
        with torch.no_grad():
            for param in self._params:
                if param.grad is not None:
                    param.grad.zero_()

    def _is_live(self, peer: PeerRecord) -> bool:
        """False for a peer that missed a round it was expected in and has published nothing since."""
        absent_since = self._absent_peers.get(peer.peer_id)
        return absent_since is None or peer.time > absent_since

    def _live_peers_at(self, view: CollaborationView, step: int) -> list[PeerRecord]:
        """Live peers whose record is for ``step``."""
        return [peer for peer in view.peers_at(step) if self._is_live(peer)]

    def _present_peers(self, view: CollaborationView, step: int) -> list[PeerRecord]:
        """Live peers at ``step`` plus peers that took the previous step with this one but whose record predates it."""
        present = self._live_peers_at(view, step)
        if step == self.local_step:
            for peer in view.peers_at(step - 1):
                stepped_at = self._round_mates.get(peer.peer_id)
                if stepped_at is not None and peer.time < stepped_at and self._is_live(peer):
                    present.append(peer)
        return present

    def _expected_in_round(self, view: CollaborationView, step: int) -> list[PeerRecord]:
        """Peers to wait for in this step's group: this one, its round mates, peers with samples at ``step``, peers
        that arrived at ``step`` (by a state download) after this peer did, and, for the collaboration's very first
        step (or this peer's first step after a start from a checkpoint), every peer present.

        Other peers without samples (idle, or in the middle of a state download) are not waited for: if they train,
        their samples show up in time for a later step. The first step is the exception, because peers that start
        together would otherwise race: the fastest one steps alone before the others report samples, and its solo
        step is one the others must download. Waiting costs at most one matchmaking window for a peer that never
        comes (it is then marked absent).
        """
        arrived_after = self._reached_step_at
        # the collaboration's first step, or the first one after all peers restarted from checkpoints (this peer
        # has not stepped since it started and nobody is ahead): peers starting together must not race
        first_step = view.epoch == step and (step == 0 or arrived_after is None)
        return [
            peer
            for peer in self._present_peers(view, step)
            if peer.peer_id == view.local_peer_id
            or first_step
            or peer.samples > 0
            or peer.peer_id in self._round_mates
            or (arrived_after is not None and peer.time > arrived_after)
        ]

    def _samples_toward_next_step(self, view: CollaborationView) -> int:
        step, local_id = self.local_step, view.local_peer_id
        others = sum(p.samples for p in self._live_peers_at(view, step) if p.peer_id != local_id)
        return others + self._accumulator.samples

    def _estimated_samples(self, view: CollaborationView, now: float) -> float:
        """Samples toward this peer's next step by now, extrapolating each peer's count by its reported speed.

        A peer that took the last step together with this one but whose record in ``view`` still shows the previous
        step (the view predates that step) is counted from the moment of that step.
        """
        local_id, step = view.local_peer_id, self.local_step
        estimate = float(self._accumulator.samples)
        for peer in self._present_peers(view, step):
            if peer.peer_id == local_id:
                continue
            if peer.step == step:
                estimate += peer.samples + max(0.0, now - peer.time) * peer.samples_per_second
            else:  # a round mate whose record predates the last step: counting since that step
                estimate += max(0.0, now - self._round_mates[peer.peer_id]) * peer.samples_per_second
        return estimate

    def _view_if_target_reached(self) -> CollaborationView | None:
        """A fresh view in which the collaboration reached the target, or None (then keep accumulating)."""
        deadline = time.perf_counter() + min(self._seconds_per_call, self.matchmaking_time)
        while True:
            try:
                view = self.tracker.fetch_now(timeout=self.request_timeout)
            except Exception as e:  # the DHT did not answer: keep training, try again at the next step()
                logger.warning(f"{self.prefix}: could not read the collaboration's progress: {e!r}")
                return None
            reached = self._samples_toward_next_step(view) >= self.target_batch_size
            if reached or self._peers_ahead(view, self.local_step):
                return view
            # not there yet: wait (polling) only if the others will get there before this peer could finish another
            # micro-batch; computing one would overshoot the target and delay the step by a whole micro-batch
            remaining = deadline - time.perf_counter()
            imminent = self._estimated_samples(view, get_dht_time() + remaining) >= self.target_batch_size
            if not imminent or remaining <= 0:
                return None
            time.sleep(TARGET_POLL_INTERVAL)

    def _collaborative_step(self, view: CollaborationView) -> None:
        # The state lock is held for the whole step, so a peer downloading this peer's state meanwhile gets the
        # state *after* this step instead of one that is outdated a moment later (it would have to download again).
        # The speed this peer reports counts compute only: time spent in the round would make others underestimate
        # how soon it contributes its next samples.
        with self._state_lock, self.tracker.performance_ema.pause(), self._doing("averaging"):
            self._collaborative_step_locked(view)

    @contextmanager
    def _doing(self, activity: str) -> Iterator[None]:
        previous, self.activity = self.activity, activity
        try:
            yield
        finally:
            self.activity = previous

    def _collaborative_step_locked(self, view: CollaborationView) -> None:
        step = self.local_step
        ahead = self._peers_ahead(view, step)
        if ahead and self._may_download():
            logger.log(
                self.status_loglevel,
                f"{self.prefix}: {len(ahead)} peer(s) already took step {step}; downloading their state",
            )
            self._catch_up()
            return
        if ahead:
            # the last download attempt failed (no answer, or a partial state): stepping now would take a step the
            # collaboration already took, from other parameters, and leave this peer at the others' step number
            # with a different state. Keep accumulating until the next attempt.
            return
        if not self._round_may_be_retried(view, step):
            return  # keep accumulating; a groupmate of the failed round may still show that it took the step
        group = self._expected_in_round(view, step)
        samples = self._accumulator.samples
        if self.client_mode and not any(not peer.client_mode for peer in group) and self._servers_exist(view):
            # Nobody can download a client's state: had it stepped without a peer that accepts connections, it
            # would be a step ahead of them for good (they never download from clients). Keep accumulating until
            # such a peer reaches this step; its round then includes this peer's samples.
            logger.log(self.status_loglevel, f"{self.prefix}: client peer waits for a non-client peer at step {step}")
            return
        if len(group) <= 1:
            self._step_alone()
            self._finish_step({view.local_peer_id: dict(step=step, samples=samples)})
            return
        self._missed_step = False
        gathered = self._run_round(group)
        if gathered is not None:
            self._finish_step(gathered)
        elif self._missed_step:
            self._catch_up()
        else:
            self._failed_rounds += 1

    @staticmethod
    def _servers_exist(view: CollaborationView) -> bool:
        """Whether the collaboration has peers that accept connections (and so can average and share state)."""
        return any(not peer.client_mode for peer in view.peers if peer.peer_id != view.local_peer_id)

    def _round_may_be_retried(self, view: CollaborationView, step: int) -> bool:
        """After a round that failed here once its all-reduce had begun: whether ``step`` may be tried again.

        Only if no peer of that round took the step: each one must show news at ``step`` since the failure, or be
        gone. One that took it shows the next step instead, and this peer downloads (the caller checks peers ahead
        first). A peer that shows nothing (it may have crashed in the round) is waited for at most two request
        timeouts plus one matchmaking window, enough for a peer that took the step to publish it.
        """
        if self._unsettled_round is None:
            return True
        failed_step, mates, failed_at = self._unsettled_round
        if failed_step != step:
            self._unsettled_round = None
            return True
        records = {peer.peer_id: peer for peer in view.peers}
        silent = [
            peer_id
            for peer_id in mates
            if peer_id != view.local_peer_id
            and peer_id in records
            and not (records[peer_id].step == step and records[peer_id].time > failed_at)
        ]
        if silent and get_dht_time() < failed_at + self.matchmaking_time + 2 * self.request_timeout:
            return False
        self._unsettled_round = None
        return True

    def _step_alone(self) -> None:
        """Nobody else is at this step: apply this peer's own mean gradient."""
        with self._state_lock:
            gradients = self._grad_buffers()
            self._accumulator.write_mean(gradients)
            overflow = self._scaling_loss and not self._loss_scale.unscale_(gradients)  # type: ignore[union-attr]
            self._apply_optimizer_step(overflow=overflow)

    def _grad_buffers(self) -> list[torch.Tensor]:
        for param in self._params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        return [param.grad for param in self._params]

    def _apply_optimizer_step(self, overflow: bool = False) -> None:
        """``opt.step()`` with the gradients in ``param.grad``, unless they contain inf/NaN.

        With fp16 loss scaling an overflow flagged by any peer skips the step and backs the scale off. Any other
        inf/NaN in the (averaged) gradient also skips the step, so that one faulty or malicious peer cannot make
        every replica's parameters non-finite. Every member of a round sees the same averaged values, so all of
        them skip together and stay identical.
        """
        if self._scaling_loss:
            self._loss_scale.update(found_inf=overflow)  # type: ignore[union-attr]
        nonfinite = not overflow and not _all_finite(param.grad for param in self._params)
        self.last_step_overflowed = overflow or nonfinite
        if overflow:
            self._overflow_steps += 1
            logger.warning(f"{self.prefix}: inf/NaN in the fp16 gradients of step {self.local_step}; skipping it")
        elif nonfinite:
            self._nonfinite_steps += 1
            logger.warning(
                f"{self.prefix}: the averaged gradient of step {self.local_step} contains inf/NaN (a peer sent "
                "non-finite gradients); skipping this update on every peer of the round"
            )
        else:
            self.opt.step()
        # the scheduler follows the step count, skipped or not, so that every peer's learning rate stays the same
        if self.scheduler is not None:
            self.scheduler.step()

    def _run_round(self, group: Sequence[PeerRecord]) -> dict[bytes, dict[str, int]] | None:
        """Average gradients with ``group`` and apply the result; the gathered ``{peer: info}`` or None on failure."""
        with torch.no_grad(), self._averager.get_tensors() as buffers:
            gradients = buffers[: len(self._params)]
            self._accumulator.write_mean(gradients)
            if self._scaling_loss:  # unscale once per step; a peer's inf/NaN must not reach the others
                buffers[-1].fill_(0.0 if self._loss_scale.unscale_(gradients) else 1.0)  # type: ignore[union-attr]
        gathered = self._allreduce(group)
        if gathered is None:
            return None
        with self._state_lock, torch.no_grad(), self._averager.get_tensors() as buffers:
            for grad, averaged in zip(self._grad_buffers(), buffers, strict=False):
                grad.copy_(averaged, non_blocking=True)
            overflow = self._scaling_loss and float(buffers[-1]) > 0
            self._apply_optimizer_step(overflow=overflow)
        return gathered

    def _allreduce(self, group: Sequence[PeerRecord]) -> dict[bytes, dict[str, int]] | None:
        """One all-reduce of the averager's buffers with the peers of ``group``; gathered info or None on failure."""
        step, samples = self.local_step, self._accumulator.samples
        group_size = len(group) if self._group_size_cap is None else min(len(group), self._group_size_cap)
        started = time.perf_counter()
        control = None
        try:
            self._averager.prepare_round(step, group_size, timeout=self.averaging_timeout)
            control = self._averager.step(
                gather=dict(step=step, samples=samples),
                weight=float(samples),
                scheduled_time=get_dht_time() + self.matchmaking_time,
                timeout=self.matchmaking_time + 2 * self.request_timeout,
                allow_retries=False,
                wait=False,
            )
            result = self._wait_for_round(control, step)
            if result is None:
                control.cancel()
                logger.log(self.status_loglevel, f"{self.prefix}: other peers took step {step} without this peer")
                self._missed_step = True
                return None
        except BaseException as e:
            if control is not None and not control.done():
                control.cancel()
            # hivemind cancels a step's future from inside the averager (e.g. when matchmaking is torn down), and
            # result() then raises asyncio.CancelledError, a BaseException: that is a failed round, not an interrupt
            if not isinstance(e, (Exception, asyncio.CancelledError)):
                raise
            if control is not None and not control.began_allreduce:
                # no group formed: nobody we expected came; do not wait for them again until they publish news
                self._note_absent_peers(group, {self.tracker.view.local_peer_id: {}})
            elif control is not None:
                # the all-reduce began: groupmates that got all their parts applied this round (hivemind's all-reduce
                # is not atomic). Retrying the step without them would fork the replicas.
                self._unsettled_round = (step, frozenset(peer.peer_id for peer in group), get_dht_time())
                self._announce()  # tells the groupmates at once that this peer did not take the step
            logger.warning(f"{self.prefix}: averaging for step {step} failed ({e!r}); will retry or resynchronize")
            return None
        gathered = {peer_id.to_bytes(): info for peer_id, info in result.items()}
        steps = {info.get("step") if isinstance(info, dict) else None for info in gathered.values()}
        if steps != {step}:
            logger.warning(f"{self.prefix}: averaging group for step {step} contained peers at steps {steps}")
            return None
        self._note_absent_peers(group, gathered)
        gathered_samples = sum(_sample_count(info) for info in gathered.values())
        if self._group_size_cap is None and gathered_samples < self.target_batch_size:
            # the view that triggered this round counted samples that did not come: a peer expected in the group
            # never joined it, or a progress record overstated its samples. Applying the round would step before
            # the collaboration accumulated target_batch_size samples; every member sees the same gathered counts,
            # so all of them skip it together and keep accumulating.
            self._short_rounds += 1
            logger.warning(
                f"{self.prefix}: the group for step {step} gathered {gathered_samples} of {self.target_batch_size} "
                f"samples ({len(gathered)} of {len(group)} expected peers came); not applying it, accumulating more"
            )
            return None
        logger.log(
            self.status_loglevel,
            f"{self.prefix}: averaged step {step} with {len(gathered)} of {len(group)} expected peer(s) in "
            f"{time.perf_counter() - started:.3f}s",
        )
        return gathered

    def _wait_for_round(self, control: StepControl, step: int) -> dict[Any, Any] | None:
        """The round's gathered data; None if, while the group was still forming, other peers took the step."""
        deadline = time.perf_counter() + self.matchmaking_time + self.averaging_timeout + 2 * self.request_timeout
        while True:
            try:
                return control.result(timeout=max(0.0, min(ROUND_POLL_INTERVAL, deadline - time.perf_counter())))
            except (TimeoutError, FutureTimeoutError):  # distinct classes before Python 3.11
                if time.perf_counter() >= deadline:
                    raise
            if control.stage == AveragingStage.LOOKING_FOR_GROUP:
                try:
                    if self._peers_ahead(self.tracker.fetch_now(timeout=self.request_timeout), step):
                        return None
                except (TimeoutError, FutureTimeoutError):
                    pass

    def _note_absent_peers(self, group: Sequence[PeerRecord], gathered: dict[bytes, Any]) -> None:
        for peer in group:
            if peer.peer_id not in gathered:
                self._absent_peers[peer.peer_id] = peer.time
        for peer_id in gathered:
            self._absent_peers.pop(peer_id, None)

    def _finish_step(self, gathered: dict[bytes, dict[str, int]]) -> None:
        self._last_round = gathered
        now = self._reached_step_at = get_dht_time()
        self._round_mates = {peer_id: now for peer_id in gathered}
        self._set_local_step(self.local_step + 1)
        self._last_round_reached = self.local_step

    def _announce(self) -> None:
        """Tell the others at once that this peer is at its current step (so that they count it in)."""
        try:
            self.tracker.announce(timeout=self.request_timeout)
        except Exception as e:  # not fatal: the background reporter publishes with the next samples
            logger.debug(f"{self.prefix}: could not announce this peer: {e!r}")

    def _set_local_step(self, step: int) -> None:
        """Move to collaborative step ``step`` with empty accumulators, and tell the other peers."""
        with self._state_lock:
            self._accumulator.reset()
            self.local_step = step
        with self.tracker.pause_updates():
            self.tracker.update_epoch(step)
        if not self.client_mode:
            self._averager.state_sharing_priority = step  # peers download from the most advanced peer first

    def _shared_state(self) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """The state a joining peer downloads (called from the averager's background thread)."""
        with self._state_lock:
            return capture_state(self.opt, self.scheduler, self.local_step)


class CollaborativeAdaptiveOptimizer(CollaborativeOptimizer):
    """Averages parameters and adaptive optimizer statistics instead of gradients.

    At each collaborative step every peer applies ``opt.step()`` with its *own* accumulated mean gradient; then the
    peers average (sample-weighted) their parameters and the optimizer statistics named in
    ``average_opt_statistics`` (e.g. Adam's ``exp_avg_sq``), so all of them hold identical parameters and identical
    named statistics afterwards. If averaging fails, the local step is rolled back and retried later.

    Args:
        opt: a standard PyTorch optimizer, typically an adaptive one (Adam, LAMB).
        average_opt_statistics: names of per-parameter optimizer state tensors to average, e.g. ``["exp_avg_sq"]``.
        **kwargs: every argument of :class:`CollaborativeOptimizer`.

    Raises:
        ValueError: if a name in ``average_opt_statistics`` is not a per-parameter tensor of the optimizer state.
    """

    def __init__(self, opt: torch.optim.Optimizer, average_opt_statistics: Sequence[str], **kwargs: Any):
        if kwargs.get("grad_scaler") is not None:
            raise ValueError(
                "grad_scaler (fp16 mixed precision) is not supported by CollaborativeAdaptiveOptimizer: each peer "
                "steps locally before averaging. Use bf16 mixed precision, or CollaborativeOptimizer."
            )
        if isinstance(average_opt_statistics, str) or not all(isinstance(n, str) for n in average_opt_statistics):
            raise ValueError(
                f"average_opt_statistics must be a list of optimizer state names, got {average_opt_statistics!r}"
            )
        self.average_opt_statistics = tuple(average_opt_statistics)
        super().__init__(opt, **kwargs)

    def _prepare_optimizer(self) -> None:
        """Create the optimizer state (without changing anything) so the statistics can be averaged from the start."""
        if any(len(self.opt.state.get(param, {})) for param in self._params):
            self._check_statistics()
            return
        # one step with zero gradients and learning rate 0 creates the state; step counters are then reset so the
        # first real update is exactly a fresh optimizer's first update
        saved_grads = [param.grad for param in self._params]
        saved_lrs = [group["lr"] for group in self.opt.param_groups]
        try:
            for param in self._params:
                param.grad = torch.zeros_like(param)
            for group in self.opt.param_groups:
                group["lr"] = 0.0
            self.opt.step()
        finally:
            for group, lr in zip(self.opt.param_groups, saved_lrs, strict=True):
                group["lr"] = lr
            for param, grad in zip(self._params, saved_grads, strict=True):
                param.grad = grad
        # zero every state entry (weight decay, for one, leaves non-zero moments after a zero-gradient step), so
        # that the state equals a fresh optimizer's lazily created state (SGD: exact when dampening is 0)
        with torch.no_grad():
            for param_state in self.opt.state.values():
                for key, value in param_state.items():
                    if isinstance(value, torch.Tensor):
                        value.zero_()
                    elif isinstance(value, (int, float)) and not isinstance(value, bool):
                        param_state[key] = type(value)(0)
        self._check_statistics()

    def _check_statistics(self) -> None:
        for name in self.average_opt_statistics:
            for param in self._params:
                value = self.opt.state.get(param, {}).get(name)
                if not isinstance(value, torch.Tensor) or value.shape != param.shape:
                    available = sorted(
                        key for key, v in self.opt.state.get(param, {}).items() if isinstance(v, torch.Tensor)
                    )
                    raise ValueError(
                        f"average_opt_statistics: {name!r} is not a per-parameter tensor in the state of "
                        f"{type(self.opt).__name__}; available names: {available}"
                    )

    def _local_tensors(self) -> list[torch.Tensor]:
        stats = [self.opt.state[param][name] for name in self.average_opt_statistics for param in self._params]
        return [*self._params, *stats]

    def _make_averaged_tensors(self) -> list[torch.Tensor]:
        return [tensor.detach().to("cpu", copy=True) for tensor in self._local_tensors()]

    def _run_round(self, group: Sequence[PeerRecord]) -> dict[bytes, dict[str, int]] | None:
        with self._state_lock:
            rollback = capture_state(self.opt, self.scheduler, self.local_step)
            # with reuse_grad_buffers the local step turns param.grad into the mean in place: keep the sums
            saved_grads = [g.detach().clone() for g in self._grad_buffers()] if self.reuse_grad_buffers else []
            self._step_alone()
            with torch.no_grad(), self._averager.get_tensors() as buffers:
                for buffer, local in zip(buffers, self._local_tensors(), strict=True):
                    buffer.copy_(local)
            gathered = None
            try:
                gathered = self._allreduce(group)
            finally:
                with torch.no_grad():
                    if gathered is None:  # failed (or interrupted): undo the local step, keep the gradients
                        restore_state(self.opt, self.scheduler, *rollback)
                        for grad, saved in zip(self._grad_buffers(), saved_grads, strict=False):
                            grad.copy_(saved)
                    else:
                        with self._averager.get_tensors() as buffers:
                            for local, averaged in zip(self._local_tensors(), buffers, strict=True):
                                local.copy_(averaged)
        return gathered


__all__ = [
    "CollaborativeOptimizer",
    "CollaborativeAdaptiveOptimizer",
    "CollaborationState",
    "DEFAULT_AVERAGING_TIMEOUT",
    "DEFAULT_MATCHMAKING_TIME",
]
