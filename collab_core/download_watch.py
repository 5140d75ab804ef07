"""Watching a state download: progress lines for the user, and when to give up (no progress, not a fixed total).

A state download's length is the state's size over the joiner's bandwidth: 100 MB at 20 Mbit/s is 40 s, 1 GB at
10 Mbit/s over 13 minutes. So a download is abandoned only when it stops moving, not after a fixed time: when no byte
arrived and no new serving peer was tried for ``stall_timeout`` seconds. The averager process counts what it received
(:class:`DownloadProgress`, shared memory); the trainer's process polls it and feeds it to :class:`DownloadWatch`,
which decides what to say and whether the download stalled. Everything here is pure: time is an argument.
"""

from __future__ import annotations

from dataclasses import dataclass

#: the first progress line comes after this many seconds of downloading (a small state loads silently) ...
FIRST_REPORT_SECONDS = 3.0
#: ... and the next ones at most this often
REPORT_EVERY_SECONDS = 10.0


@dataclass(frozen=True)
class DownloadProgress:
    """The averager's counters of state downloads (one snapshot).

    Attributes:
        attempt: how many serving peers this averager has tried since it started (all downloads together).
        received_bytes: tensor bytes received from the current serving peer.
        expected_bytes: the size the current serving peer announced, or None (not known yet, or an older peer).
    """

    attempt: int = 0
    received_bytes: int = 0
    expected_bytes: int | None = None


@dataclass(frozen=True)
class WatchVerdict:
    """What to do after one observation.

    Attributes:
        line: a progress line to show the user, or None.
        stalled: the download made no progress for ``stall_timeout`` seconds: give up on it.
    """

    line: str | None = None
    stalled: bool = False


def megabytes(count: int) -> str:
    """``count`` bytes, for people: "42.0 MB"."""
    return f"{count / 1e6:.1f} MB"


def transfer_rate(count: int, seconds: float) -> str:
    """The rate of ``count`` bytes over ``seconds``: "8.4 Mbit/s" ("unknown" over no time)."""
    if seconds <= 0:
        return "unknown Mbit/s"
    return f"{8 * count / seconds / 1e6:.1f} Mbit/s"


class DownloadWatch:
    """Follows one state download from the counters of :class:`DownloadProgress`.

    Call :meth:`observe` with each new snapshot (e.g. once a second) until the download ends, then :meth:`summary`.

    Args:
        stall_timeout: give up after this many seconds without progress (no new byte, no new serving peer).
        now: when the download started (``time.monotonic()``).
        before: the counters just before it started (they count every download of the averager).
    """

    def __init__(self, stall_timeout: float, now: float, before: DownloadProgress):
        self.stall_timeout = stall_timeout
        self.started_at = now
        self.first_attempt = before.attempt + 1
        self.latest = before
        self.moved_at = now  # the last time a byte arrived or a new serving peer was tried
        # the rate is measured from the first snapshot of the current serving peer (its transfer may have begun up
        # to a poll earlier, with bytes already counted: measured from its start, the rate would come out too high)
        self.rate_base = (now, 0)
        self.reported_at: float | None = None
        self.abandoned_bytes = 0  # bytes received from serving peers that stopped before the end

    def observe(self, now: float, progress: DownloadProgress) -> WatchVerdict:
        """Take a new snapshot of the counters; returns the line to show (if any) and whether the download stalled."""
        previous, self.latest = self.latest, progress
        line = None
        if progress.attempt != previous.attempt:  # the averager moved on to another serving peer
            self.moved_at = now
            self.rate_base = (now, progress.received_bytes)
            if previous.attempt >= self.first_attempt and previous.received_bytes > 0:
                self.abandoned_bytes += previous.received_bytes
                line = (
                    f"the peer serving the state stopped after {megabytes(previous.received_bytes)}; "
                    "downloading it from another peer"
                )
                self.reported_at = now
        elif progress.received_bytes != previous.received_bytes:
            self.moved_at = now
        if line is None and self._report_due(now) and progress.attempt >= self.first_attempt:
            line = self.describe(now)
            self.reported_at = now
        return WatchVerdict(line=line, stalled=now - self.moved_at >= self.stall_timeout)

    def _report_due(self, now: float) -> bool:
        if self.reported_at is None:
            return now - self.started_at >= FIRST_REPORT_SECONDS
        return now - self.reported_at >= REPORT_EVERY_SECONDS

    def describe(self, now: float) -> str:
        """The download so far: "downloading the state: 42.0 of 100.1 MB (8.4 Mbit/s), 40 s"."""
        progress = self.latest
        of = f" of {megabytes(progress.expected_bytes)}" if progress.expected_bytes is not None else ""
        base_time, base_bytes = self.rate_base
        rate = transfer_rate(progress.received_bytes - base_bytes, now - base_time)
        return (
            f"downloading the state: {megabytes(progress.received_bytes)}{of} ({rate}), {now - self.started_at:.0f} s"
        )

    @property
    def reported(self) -> bool:
        """Whether any progress line was shown (then the end deserves one too)."""
        return self.reported_at is not None

    def summary(self, now: float, received_bytes: int) -> str:
        """The closing line of a download that was reported: size, time, rate."""
        seconds = now - self.started_at
        return (
            f"downloaded the state: {megabytes(received_bytes)} in {seconds:.0f} s "
            f"({transfer_rate(received_bytes + self.abandoned_bytes, seconds)})"
        )


__all__ = [
    "FIRST_REPORT_SECONDS",
    "REPORT_EVERY_SECONDS",
    "DownloadProgress",
    "DownloadWatch",
    "WatchVerdict",
    "megabytes",
    "transfer_rate",
]
