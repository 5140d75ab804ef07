"""The reference optimizer API (``CollaborativeOptimizer``, ``CollaborativeAdaptiveOptimizer``): thin façades.

Each validates its arguments, builds this peer's :class:`~collab_core.local_update.LocalUpdate` and an averaging
scheme (:class:`~collab_core.schemes.GradientAveraging` or :class:`~collab_core.schemes.ParameterAveraging`; the
DiLoCo façade in :mod:`collab_core.diloco` adds :class:`~collab_core.diloco.DiLoCoAveraging`), and
hands both to one :class:`~collab_core.collaboration.Collaboration`, the engine that runs every scheme (how a step
works, failures, forks and threads are described there). What stays here is the ``torch.optim.Optimizer`` surface.
"""

from __future__ import annotations

import inspect
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.dht import DHT

from collab_core import hivemind_patches
from collab_core.collaboration import Collaboration, CollaborationState, StepReport
from collab_core.local_update import LocalUpdate
from collab_core.log import get_logger
from collab_core.scheduler import check_collaborative_scheduler
from collab_core.schemes import AveragingScheme, GradientAveraging, ParameterAveraging
from collab_core.timeouts import RoundTimeouts
from collab_core.wrapped_optimizer import WrappedOptimizerView

logger = get_logger(__name__)

#: used when ``averaging_timeout=None``: no peer waits longer than this for a dead or stalled groupmate (seconds)
DEFAULT_AVERAGING_TIMEOUT = 30.0
#: how long a group waits for peers that are expected but missing (seconds); ``matchmaking_time`` overrides it
DEFAULT_MATCHMAKING_TIME = 5.0

# DecentralizedAverager arguments that the optimizer sets itself
_OWN_AVERAGER_ARGS = {"self", "averaged_tensors", "dht", "start", "prefix", "client_mode"}
_AVERAGER_ARGS = set(inspect.signature(DecentralizedAverager.__init__).parameters) - _OWN_AVERAGER_ARGS
# names from hivemind's former CollaborativeOptimizer / hivemind.Optimizer that mean min_matchmaking_time
_MATCHMAKING_TIME_ALIASES = ("averaging_expiration", "matchmaking_time")


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


class CollaborativeOptimizer(WrappedOptimizerView):
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

    #: whether gradients are accumulated between collaborative steps (DiLoCo consumes them in every step() call)
    _keeps_gradients: ClassVar[bool] = True

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
        hivemind_patches.apply()
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
        check_collaborative_scheduler(scheduler, opt)
        tracker_kwargs = dict(
            min_refresh_period=min_refresh_period,
            max_refresh_period=max_refresh_period,
            default_refresh_period=default_refresh_period,
            expected_drift_peers=expected_drift_peers,
            expected_drift_rate=expected_drift_rate,
            performance_ema_alpha=performance_ema_alpha,
            metadata_expiration=metadata_expiration,
        )
        for name in ("min_refresh_period", "max_refresh_period", "default_refresh_period", "metadata_expiration"):
            _positive_number(name, tracker_kwargs[name])
        if min_refresh_period > max_refresh_period:
            raise ValueError(
                f"min_refresh_period ({min_refresh_period}) must not exceed max_refresh_period ({max_refresh_period})"
            )
        averager_kwargs = self._averager_kwargs(kwargs)
        round_timeout = DEFAULT_AVERAGING_TIMEOUT if averaging_timeout is None else float(averaging_timeout)
        averager_kwargs.setdefault("allreduce_timeout", round_timeout)
        timeouts = RoundTimeouts(
            matchmaking=float(averager_kwargs["min_matchmaking_time"]),
            averaging=round_timeout,
            request=float(averager_kwargs["request_timeout"]),
            chunk=averager_kwargs.get("next_chunk_timeout"),
        )
        # hivemind uses next_chunk_timeout as the per-chunk timeout of state downloads (and of all-reduce senders);
        # a serving peer answers after its current step, which may take a matchmaking window plus an all-reduce
        averager_kwargs["next_chunk_timeout"] = timeouts.state_chunk

        self.opt, self.scheduler, self.dht, self.prefix = opt, scheduler, dht, prefix
        self.target_batch_size, self.batch_size_per_step = target_batch_size, batch_size_per_step
        self.step_tolerance = step_tolerance
        self.timeouts = timeouts
        self.averaging_timeout = round_timeout
        self.matchmaking_time = timeouts.matchmaking
        self.request_timeout = timeouts.request
        self.reuse_grad_buffers = reuse_grad_buffers
        self.grad_scaler = grad_scaler
        self._zero_grad_warned = False
        if client_mode and not dht.client_mode:
            logger.warning(
                "client_mode=True, but the DHT accepts incoming connections: start it with client_mode=True "
                "(collab_core.start_dht does this from the settings) to accept no incoming connections at all"
            )
        self.client_mode = bool(client_mode or dht.client_mode)

        local = LocalUpdate(
            opt,
            scheduler,
            reuse_grad_buffers=reuse_grad_buffers,
            accumulate_grads_on=accumulate_grads_on,
            grad_scaler=grad_scaler,
            prefix=prefix,
            keep_gradients=self._keeps_gradients,
        )
        #: the engine this façade drives (see :class:`collab_core.collaboration.Collaboration`)
        self.collaboration = Collaboration(
            self._make_scheme(local),
            local,
            dht=dht,
            prefix=prefix,
            target_batch_size=target_batch_size,
            timeouts=timeouts,
            step_tolerance=step_tolerance,
            client_mode=self.client_mode,
            averager_kwargs=averager_kwargs,
            tracker_kwargs=tracker_kwargs,
            group_size_cap=averager_kwargs.pop("target_group_size", None),
            max_backoff=float(metadata_expiration),
            verbose=verbose,
        )
        self.status_loglevel = self.collaboration.status_loglevel
        self.tracker = self.collaboration.tracker

    def _make_scheme(self, local: LocalUpdate) -> AveragingScheme:
        """The averaging scheme of this optimizer (overridden by the adaptive one)."""
        return GradientAveraging(local)

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

    # ------------------------------------------------------------------ torch.optim.Optimizer pass-through
    # (param_groups, state, defaults: the wrapped optimizer's, see WrappedOptimizerView)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Not supported: every peer must average the same tensors, fixed when the optimizer is created."""
        raise NotImplementedError("add parameter groups to the wrapped optimizer before creating the collaboration")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(prefix={self.prefix!r}, local_step={self.local_step}, opt={self.opt!r})"

    # ------------------------------------------------------------------ public API

    @property
    def local_step(self) -> int:
        """Collaborative steps this peer has taken (the same on every peer of a step)."""
        return self.collaboration.local_step

    @property
    def activity(self) -> str:
        """What the optimizer is doing, for progress displays: "accumulating", "averaging", "downloading",
        "leaving", "stopped"."""
        return self.collaboration.activity

    @property
    def last_step_overflowed(self) -> bool:
        """Whether the last collaborative step's update was skipped for inf/NaN gradients (fp16 or otherwise)."""
        return self.collaboration.local.last_step_skipped

    @property
    def last_step_report(self) -> StepReport | None:
        """What the last :meth:`step` call did (accumulated, updated, skipped, downloaded, round failed)."""
        return self.collaboration.last_report

    @property
    def is_synchronized(self) -> bool:
        """Whether this peer is at most ``step_tolerance`` collaborative steps behind the collaboration."""
        return self.local_step >= self.tracker.view.epoch - self.step_tolerance

    @property
    def collaboration_state(self) -> CollaborationState:
        """This peer's view of the collaboration (see :class:`~collab_core.collaboration.CollaborationState`)."""
        return self.collaboration.collaboration_state()

    def step(  # type: ignore[override]  # the reference API takes batch_size first
        self, batch_size: int | None = None, closure: Callable[[], Any] | None = None, **kwargs: Any
    ) -> Any:
        """Report ``batch_size`` more samples (whose gradients are in ``param.grad``); update when the target is met.

        Call it once per micro-batch, after ``loss.backward()``. What the call did is in :attr:`last_step_report`.

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
            self.collaboration.record_loss(loss)
        batch_size = self._resolve_batch_size(batch_size)
        if self.collaboration.is_shut_down:
            raise ValueError(f"this {type(self).__name__} was shut down; create a new one to keep training")
        self.collaboration.try_step(batch_size)
        return loss

    def record_loss(self, loss: Any) -> None:
        """Publish ``loss`` (a number or a one-element tensor) as this peer's latest training loss.

        It goes into this peer's metrics record, which ``collab monitor`` shows (loss against step). Call it once per
        micro-batch, or as often as convenient; only the latest value is published (at most once a second, without
        waiting for the network). A closure's loss passed to :meth:`step` is recorded automatically.
        """
        self.collaboration.record_loss(loss)

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
        return self.collaboration.wait_for_peers(num_peers, timeout)

    def load_state_from_peers(self, **kwargs: Any) -> bool:
        """Download parameters, optimizer state, scheduler state and step counter from another peer.

        Locally accumulated gradients are discarded (they were computed for the old parameters).

        Args:
            **kwargs: ``timeout`` (seconds; default: long enough for the serving peer to finish its current step).

        Returns:
            True if a state was downloaded, False if no peer could provide one.
        """
        timeout = kwargs.pop("timeout", None)
        if kwargs:
            raise TypeError(f"unexpected argument(s) to load_state_from_peers(): {sorted(kwargs)}")
        return self.collaboration.load_state_from_peers(timeout)

    def state_dict(self) -> dict[str, Any]:
        """A checkpoint: the wrapped optimizer's and scheduler's state dicts, the collaborative step and the state
        fingerprint. Works after :meth:`shutdown` too (e.g. to save a checkpoint once training has finished)."""
        return self.collaboration.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a checkpoint made by :meth:`state_dict` (a plain optimizer state dict is accepted as well)."""
        self.collaboration.load_state_dict(state_dict)

    def shutdown(self) -> None:
        """Leave the collaboration: wait (bounded) until the peers of this peer's last step have it too, withdraw
        this peer's progress record and stop the averager. Idempotent."""
        self.collaboration.shutdown()

    def __del__(self) -> None:
        try:
            collaboration = self.__dict__.get("collaboration")
            if collaboration is not None and not collaboration.is_shut_down:
                collaboration.shutdown()
        except Exception:  # noqa: S110 - interpreter shutdown: nothing useful left to do
            pass

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

    def _make_scheme(self, local: LocalUpdate) -> AveragingScheme:
        return ParameterAveraging(local, self.average_opt_statistics, reuse_grad_buffers=self.reuse_grad_buffers)


__all__ = [
    "CollaborativeOptimizer",
    "CollaborativeAdaptiveOptimizer",
    "CollaborationState",
    "DEFAULT_AVERAGING_TIMEOUT",
    "DEFAULT_MATCHMAKING_TIME",
]
