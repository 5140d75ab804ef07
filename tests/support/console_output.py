"""Reading a peer's captured console the way a person would: our log lines, ETAs, join hints, tqdm frames.

Used by the example tests (Lightning, Accelerate, ``make demo``) to check that what a newcomer sees tells the truth
at a human pace: the join hint once, no absurd ETA, a few of our lines per second at most, an Accelerate bar with
integer steps that fills.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

from collab_core.reporting import MAX_ETA_SECONDS

#: a line of the ``collab_core`` logger (``collab_core.log``): "Dec 03 08:30:01.123 [INFO] [collab_core.x] message"
OUR_LOG_LINE = re.compile(r"^(\w{3} +\d+ \d\d:\d\d:\d\d)\.\d{3} \[(\w+)\] \[(collab_core[\w.]*)\] (.*)$")
JOIN_HINT = re.compile(r'COLLAB_RUN_ID=\S+ COLLAB_INITIAL_PEERS="[^"]+"')
# "ETA 0.4s", "ETA 12m05s", "ETA unknown", and the old "ETA 12800000000000000000000.00s"; Lightning's bars: tqdm's
# "collab/eta_seconds=0.0312" (or nan) and rich's "collab/eta_secon…" with the value on the next line
ETA_WORDS = re.compile(r"ETA (unknown|[0-9.e+]+s|\d+m\d\ds|\d+h\d\dm)")
ETA_METRIC = re.compile(r"collab/eta_sec\S*?\s*[=:]?\s*(nan|inf|[0-9][0-9.e+-]*)")
BAR_FRAME = re.compile(
    r"collaborative step (?P<step>\S+?):\s*(?P<percent>\d+)%\|[^|]*\| (?P<n>\d+)/(?P<total>\d+) samples "
    r"\[(?P<elapsed>[\d:]+)(?P<postfix>[^\]]*)\]"
)


def bar_metric(text: str, name: str) -> list[float]:
    """Every value of metric ``name`` (e.g. ``collab/peers``) shown in Lightning's progress bar (tqdm or rich)."""
    pattern = re.compile(re.escape(name) + r"\S*?\s*[=:]?\s*(nan|inf|[0-9][0-9.e+-]*)")
    return [float(value) for value in pattern.findall(text)]


def our_log_lines(text: str) -> list[tuple[str, str, str]]:
    """``(second, level, message)`` of every line our loggers printed."""
    found = []
    for line in re.split(r"[\r\n]", text):
        match = OUR_LOG_LINE.match(line.strip())
        if match:
            found.append((match.group(1), match.group(2), match.group(4)))
    return found


def most_lines_in_one_second(text: str, levels: tuple[str, ...] = ("INFO",)) -> int:
    """The largest number of our log lines (at ``levels``) stamped with the same second."""
    per_second = Counter(second for second, level, _ in our_log_lines(text) if level in levels)
    return max(per_second.values(), default=0)


def join_hints(text: str) -> int:
    """How often the join hint (``COLLAB_RUN_ID=... COLLAB_INITIAL_PEERS="..."``) was printed."""
    return len(JOIN_HINT.findall(text))


def _seconds(word: str) -> float:
    if word == "unknown":
        return math.nan
    if "h" in word:
        hours, minutes = word.rstrip("m").split("h")
        return 3600 * int(hours) + 60 * int(minutes)
    if "m" in word:
        minutes, seconds = word.rstrip("s").split("m")
        return 60 * int(minutes) + int(seconds)
    return float(word.rstrip("s"))


def etas(text: str) -> list[float]:
    """Every ETA shown, in seconds (NaN for "unknown"): status lines, our bars and Lightning's bar."""
    shown = [_seconds(word) for word in ETA_WORDS.findall(text)]
    return shown + [float(value) for value in ETA_METRIC.findall(text)]


def absurd_etas(text: str, bound: float = MAX_ETA_SECONDS) -> list[float]:
    """The ETAs shown that are above ``bound`` (infinite ones included)."""
    return [eta for eta in etas(text) if not math.isnan(eta) and eta > bound]


@dataclass(frozen=True)
class BarFrame:
    """One drawing of the Accelerate bar."""

    step: str
    n: int
    total: int
    elapsed_seconds: int
    postfix: str
    #: drawn right after a line was written above the bar (tqdm clears the bar, writes, redraws): a redraw that the
    #: log line caused, not the bar's own refresh
    after_write: bool = False


def bar_frames(text: str) -> list[BarFrame]:
    """Every frame of the Accelerate progress bar, in order (tqdm separates redraws with carriage returns)."""
    frames = []
    previous_end = 0
    for match in BAR_FRAME.finditer(text):
        minutes_seconds = [int(part) for part in match.group("elapsed").split(":")]
        elapsed = sum(value * 60**power for power, value in enumerate(reversed(minutes_seconds)))
        after_write = bool(frames) and "\n" in text[previous_end : match.start()]
        frames.append(
            BarFrame(
                match.group("step"),
                int(match.group("n")),
                int(match.group("total")),
                elapsed,
                match["postfix"],
                after_write,
            )
        )
        previous_end = match.end()
    return frames


__all__ = [
    "BarFrame",
    "absurd_etas",
    "bar_frames",
    "bar_metric",
    "etas",
    "join_hints",
    "most_lines_in_one_second",
    "our_log_lines",
]
