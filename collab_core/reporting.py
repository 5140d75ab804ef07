"""What a person reads: one rule for the numbers and status lines every integration shows.

* An ETA that is not known says so (``"unknown"``), and so does one above :data:`MAX_ETA_SECONDS`: before any peer's
  speed is measured, hivemind divides by an epsilon and gets ETAs like 1.28e22 s.
* Rates are measured over a window of real time (:class:`RateMeter`: samples counted in the last
  :data:`RATE_WINDOW_SECONDS`, pauses included), never over one call or one refresh: a rate taken between two calls
  a millisecond apart is an artefact, not a speed.
* Status lines (:class:`StatusThrottle`) are worth INFO when something a person cares about changed: peers joined
  or left, this peer downloaded the state, a round failed; or, for the periodic kind, every ``every_steps`` steps or
  every ``min_seconds`` seconds of progress (``idle_seconds`` without progress). Everything else goes to DEBUG.

:class:`CollaborationProgress` puts the three together for a peer's display (the Lightning progress bar, the
Accelerate bar, ``make demo``'s status file): it turns successive ``CollaborationState`` snapshots into the
numbers to show and logs the status lines. Everything here is pure (no network, no torch) and cheap to call.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from collab_core.log import get_logger

logger = get_logger(__name__)

#: an ETA above this (seconds: one day) is shown as unknown; no collaboration's next step is usefully that far away
MAX_ETA_SECONDS = 86_400.0
#: rates are measured over this many seconds of real time
RATE_WINDOW_SECONDS = 5.0
#: a rate is unknown until the measurements span at least this many seconds
RATE_MIN_SPAN_SECONDS = 1.0
#: the word shown for a number that is not known
UNKNOWN = "unknown"


def sane_eta(seconds: float | None, bound: float = MAX_ETA_SECONDS) -> float | None:
    """``seconds`` as an ETA, or None when it is not a usable estimate.

    Args:
        seconds: an estimated time to go (may be None, NaN, infinite or negative).
        bound: ETAs above this many seconds count as unknown.

    Returns:
        ``max(0, seconds)`` if it is finite and at most ``bound``; otherwise None.
    """
    if seconds is None or not math.isfinite(seconds) or seconds > bound:
        return None
    return max(0.0, float(seconds))


def eta_seconds(remaining: float, rate: float | None, bound: float = MAX_ETA_SECONDS) -> float | None:
    """Seconds until ``remaining`` samples are done at ``rate`` samples/s; None when the rate is not known.

    Args:
        remaining: samples still to go (negative counts as zero).
        rate: samples per second, or None if not measured; zero or tiny rates give None, not a huge number.
        bound: ETAs above this many seconds count as unknown.

    Returns:
        The ETA in seconds, or None.
    """
    remaining = max(0.0, float(remaining))
    if remaining == 0.0:
        return 0.0
    if rate is None or not math.isfinite(rate) or rate <= 0.0:
        return None
    return sane_eta(remaining / rate, bound)


def format_eta(seconds: float | None, bound: float = MAX_ETA_SECONDS) -> str:
    """An ETA for people: ``"0.4s"``, ``"42s"``, ``"12m05s"``, ``"3h04m"``, or ``"unknown"``.

    Args:
        seconds: the ETA (None, NaN, infinite, negative or above ``bound``: unknown).
        bound: ETAs above this many seconds are shown as unknown.

    Returns:
        The formatted ETA.
    """
    value = sane_eta(seconds, bound)
    if value is None:
        return UNKNOWN
    if value < 10:
        return f"{value:.1f}s"
    if value < 60:
        return f"{value:.0f}s"
    minutes, secs = divmod(int(round(value)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_rate(rate: float | None) -> str:
    """Samples per second for people: ``"312 samples/s"``, ``"4.2 samples/s"`` or ``"unknown samples/s"``."""
    if rate is None or not math.isfinite(rate) or rate < 0:
        return f"{UNKNOWN} samples/s"
    return f"{rate:.1f} samples/s" if rate < 100 else f"{rate:.0f} samples/s"


class RateMeter:
    """The rate of a growing total (e.g. samples processed) over the last ``window`` seconds of real time.

    Feed it the running total whenever convenient (each call, or every half second: the result does not depend on
    how often), read :meth:`rate`. Time without progress counts, so a pause lowers the rate instead of leaving
    the last two observations, a moment apart, to define it.

    Args:
        window: seconds of history the rate is measured over.
        min_span: the rate is unknown (None) until the observations span this many seconds.
        clock: the time source (seconds) when ``now`` is not given.
    """

    def __init__(
        self,
        window: float = RATE_WINDOW_SECONDS,
        min_span: float = RATE_MIN_SPAN_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if window <= 0 or min_span < 0 or min_span > window:
            raise ValueError(f"need window > 0 and 0 <= min_span <= window, got window={window}, min_span={min_span}")
        self.window, self.min_span, self.clock = float(window), float(min_span), clock
        self._points: deque[tuple[float, float]] = deque()  # (time, total), oldest first

    def observe(self, total: float, now: float | None = None) -> None:
        """Record the running ``total`` at time ``now``. A total below the last one restarts the measurement."""
        now = self.clock() if now is None else float(now)
        if self._points and (total < self._points[-1][1] or now < self._points[-1][0]):
            self._points.clear()  # a reset counter (or a clock that went back): earlier points mean nothing now
        self._points.append((now, float(total)))
        # keep exactly one point at or before the window's start: it is the baseline of the window
        while len(self._points) >= 2 and self._points[1][0] <= now - self.window:
            self._points.popleft()

    def rate(self, now: float | None = None) -> float | None:
        """Units per second over ``[now - window, now]`` (or since the first observation, if later); None while the
        observations span less than ``min_span`` seconds."""
        if not self._points:
            return None
        now = self.clock() if now is None else float(now)
        start = max(now - self.window, self._points[0][0])
        span = now - start
        if span < self.min_span or span <= 0:
            return None
        baseline = self._points[0][1]
        for point_time, total in self._points:  # the total as of the window's start (a step function)
            if point_time > start:
                break
            baseline = total
        return max(0.0, self._points[-1][1] - baseline) / span

    def reset(self) -> None:
        """Forget every observation (e.g. after a state download made the total jump)."""
        self._points.clear()


def log_above_progress_bars(target: logging.Logger, level: int, message: str) -> None:
    """Log ``message`` without tearing a tqdm progress bar (Lightning's, Accelerate's) on the same terminal: the
    bars are cleared, the line written, the bars redrawn. Without tqdm or any bar it is ``target.log``."""
    if not target.isEnabledFor(level):
        return
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with every integration
        target.log(level, message)
        return
    with tqdm.external_write_mode():
        target.log(level, message)


@dataclass(frozen=True)
class StatusSnapshot:
    """The parts of a peer's situation that status lines are about.

    Attributes:
        step: collaborative steps this peer has taken (or the step a tracker sees).
        peers: peers in the collaboration, this one included.
        downloads: state downloads so far (a count that only grows).
        failed_rounds: averaging rounds that failed on this peer so far (a count that only grows).
    """

    step: int
    peers: int
    downloads: int = 0
    failed_rounds: int = 0


class StatusThrottle:
    """Decides which status lines deserve INFO: those that tell a person something new.

    :meth:`reasons` returns why a snapshot is worth showing (empty: log it at DEBUG). Events: peers joined or left,
    a state download, a failed round. With ``periodic=True`` also the first snapshot and progress: the step moved
    and ``min_seconds`` passed since the last INFO line, or it moved ``every_steps`` steps (but at most one line
    per ``min_interval`` seconds), or nothing was shown for ``idle_seconds``.

    Args:
        periodic: also report progress periodically (a console without a progress bar); False: events only.
        every_steps: report at least every this many collaborative steps.
        min_seconds: report a step change when this many seconds passed since the last INFO line.
        idle_seconds: without a step change, report again after this many seconds (0 or less: never).
        min_interval: periodic lines never come closer than this many seconds.
        clock: the time source (seconds) when ``now`` is not given.
    """

    def __init__(
        self,
        *,
        periodic: bool = True,
        every_steps: int = 100,
        min_seconds: float = 5.0,
        idle_seconds: float = 60.0,
        min_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if every_steps < 1:
            raise ValueError(f"every_steps must be at least 1, got {every_steps}")
        self.periodic, self.every_steps = periodic, every_steps
        self.min_seconds, self.idle_seconds, self.min_interval = min_seconds, idle_seconds, min_interval
        self.clock = clock
        self._last: StatusSnapshot | None = None  # the previous snapshot (for events)
        self._shown_step: int | None = None  # the step of the last INFO line
        self._shown_at = -math.inf  # when the last INFO line was decided

    def reasons(self, snapshot: StatusSnapshot, now: float | None = None) -> tuple[str, ...]:
        """Why ``snapshot`` deserves INFO (in words), or ``()`` for DEBUG; records the snapshot."""
        now = self.clock() if now is None else float(now)
        last, self._last = self._last, snapshot
        found: list[str] = []
        if last is None:
            if self.periodic:
                found.append("started")
        else:
            if snapshot.peers > last.peers:
                joined = snapshot.peers - last.peers
                found.append(f"{joined} peer{'s' if joined > 1 else ''} joined")
            elif snapshot.peers < last.peers:
                left = last.peers - snapshot.peers
                found.append(f"{left} peer{'s' if left > 1 else ''} left")
            if snapshot.downloads > last.downloads:
                found.append("downloaded the collaboration's state")
            if snapshot.failed_rounds > last.failed_rounds:
                found.append(f"an averaging round failed ({snapshot.failed_rounds} so far)")
        if not found and self.periodic:
            since = now - self._shown_at
            moved = self._shown_step is not None and snapshot.step != self._shown_step
            far = self._shown_step is not None and abs(snapshot.step - self._shown_step) >= self.every_steps
            idle = self.idle_seconds > 0 and since >= self.idle_seconds
            if since >= self.min_interval and ((moved and since >= self.min_seconds) or far or idle):
                found.append("progress")
        if found:
            self._shown_step, self._shown_at = snapshot.step, now
        return tuple(found)

    def level(self, snapshot: StatusSnapshot, now: float | None = None, info: int = logging.INFO) -> int:
        """``info`` if :meth:`reasons` finds any, else ``logging.DEBUG``."""
        return info if self.reasons(snapshot, now) else logging.DEBUG


@dataclass(frozen=True)
class ProgressSnapshot:
    """The numbers a display shows for one peer at one moment.

    Attributes:
        step: collaborative steps this peer has taken (an integer).
        peers: peers in the collaboration, this one included (last view).
        samples: samples accumulated toward the next step, all peers together (last view).
        target: samples per collaborative step.
        samples_per_second: the collaboration's progress toward its steps (samples/s) over the last
            :data:`RATE_WINDOW_SECONDS` of real time; None while not known.
        eta_seconds: seconds until the next step at that rate; None while not known (never absurd).
    """

    step: int
    peers: int
    samples: int
    target: int
    samples_per_second: float | None
    eta_seconds: float | None


def status_line(prefix: str, progress: ProgressSnapshot, reasons: tuple[str, ...] = ()) -> str:
    """The one-line status every integration logs, e.g.
    ``digits: step 12, 96/256 samples, 2 peers, 310 samples/s, ETA 0.5s (1 peer joined)``."""
    peers = f"{progress.peers} peer{'s' if progress.peers != 1 else ''}"
    line = (
        f"{prefix}: step {progress.step}, {progress.samples}/{progress.target} samples, {peers}, "
        f"{format_rate(progress.samples_per_second)}, ETA {format_eta(progress.eta_seconds)}"
    )
    shown = [reason for reason in reasons if reason not in ("started", "progress")]
    return f"{line} ({', '.join(shown)})" if shown else line


class CollaborationProgress:
    """A peer's display numbers and status lines, from successive ``collaboration_state`` snapshots.

    Call :meth:`update` as often as the display refreshes (e.g. twice a second). The rate is the collaboration's
    progress toward its steps (``step * target + samples accumulated``) over :data:`RATE_WINDOW_SECONDS` of real
    time, restarted after a state download (the step then jumps); the ETA follows from it. Status lines go
    through a :class:`StatusThrottle`: at ``level`` when it finds a reason, at DEBUG otherwise.

    Args:
        prefix: what status lines start with (the run id).
        periodic: also log progress periodically (for consoles without a progress bar); False: state changes only.
        level: the level of lines worth showing (INFO; DEBUG silences them unless debugging).
        log: ``log(level, message)`` writes a status line (default: the ``collab_core.reporting`` logger, through
            :func:`log_above_progress_bars`, so that a progress bar on the same terminal stays intact).
        window: seconds of real time the rate is measured over.
        clock: the time source (seconds).
        **throttle: passed to :class:`StatusThrottle` (``every_steps``, ``min_seconds``, ``idle_seconds``, ...).
    """

    def __init__(
        self,
        prefix: str,
        *,
        periodic: bool = False,
        level: int = logging.INFO,
        log: Callable[[int, str], None] | None = None,
        window: float = RATE_WINDOW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        **throttle: Any,
    ) -> None:
        self.prefix, self.level, self.clock = prefix, level, clock
        self._log = log if log is not None else (lambda level, message: log_above_progress_bars(logger, level, message))
        self.meter = RateMeter(window=window, clock=clock)
        self.throttle = StatusThrottle(periodic=periodic, clock=clock, **throttle)
        self._downloads: int | None = None
        #: the numbers of the last :meth:`update` (None before the first)
        self.latest: ProgressSnapshot | None = None

    def update(self, state: Any, now: float | None = None) -> ProgressSnapshot:
        """Take a ``CollaborationState`` (or anything with its fields), log a status line, return the numbers.

        Args:
            state: ``CollaborativeOptimizer.collaboration_state`` (``optimizer_step``, ``num_peers``,
                ``samples_accumulated``, ``target_batch_size``, ``state_downloads``, ``failed_rounds``).
            now: the time (seconds, same clock as ``clock``); default: now.

        Returns:
            What to display.
        """
        now = self.clock() if now is None else float(now)
        step, target = int(state.optimizer_step), int(state.target_batch_size)
        samples = max(0, int(state.samples_accumulated))
        downloads = int(getattr(state, "state_downloads", 0))
        if self._downloads is not None and downloads != self._downloads:
            self.meter.reset()  # the step jumped to the collaboration's: that is not this collaboration's speed
        self._downloads = downloads
        self.meter.observe(step * target + samples, now)
        rate = self.meter.rate(now)
        progress = ProgressSnapshot(
            step=step,
            peers=int(state.num_peers),
            samples=samples,
            target=target,
            samples_per_second=rate,
            eta_seconds=eta_seconds(target - samples, rate),
        )
        snapshot = StatusSnapshot(
            step=step, peers=progress.peers, downloads=downloads, failed_rounds=int(getattr(state, "failed_rounds", 0))
        )
        reasons = self.throttle.reasons(snapshot, now)
        if reasons or logger.isEnabledFor(logging.DEBUG):  # the line is not even formatted when nobody sees it
            self._log(self.level if reasons else logging.DEBUG, status_line(self.prefix, progress, reasons))
        self.latest = progress
        return progress


__all__ = [
    "MAX_ETA_SECONDS",
    "RATE_WINDOW_SECONDS",
    "RATE_MIN_SPAN_SECONDS",
    "UNKNOWN",
    "CollaborationProgress",
    "ProgressSnapshot",
    "RateMeter",
    "StatusSnapshot",
    "StatusThrottle",
    "eta_seconds",
    "format_eta",
    "format_rate",
    "log_above_progress_bars",
    "sane_eta",
    "status_line",
]
