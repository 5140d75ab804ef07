"""Timing probes installed in a peer process, from outside the code under test.

* :func:`install_round_probe` wraps hivemind's ``DecentralizedAverager._aggregate_with_group`` *before* the
  averager process is forked, so every all-reduce (ours and raw hivemind's) reports its start, end and group size
  through a multiprocessing queue (wall-clock ``time.time()``, comparable across processes).
* :class:`CallProbe` wraps bound methods of the main process (e.g. a synchronous DHT read) and records their spans.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
from collections.abc import Callable
from typing import Any

from hivemind.averaging import DecentralizedAverager

_ROUNDS: Any = None


def install_round_probe() -> None:
    """Record every all-reduce of every averager created (forked) after this call."""
    global _ROUNDS
    if _ROUNDS is not None:
        return
    _ROUNDS = mp.get_context("fork").SimpleQueue()
    original = DecentralizedAverager._aggregate_with_group
    rounds = _ROUNDS

    async def timed(self: Any, group_info: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.time()
        ok = False
        try:
            result = await original(self, group_info, *args, **kwargs)
            ok = True
            return result
        finally:
            rounds.put(
                {
                    "averager": str(self.prefix),
                    "start": started,
                    "end": time.time(),
                    "group": len(group_info.peer_ids),
                    "ok": ok,
                }
            )

    DecentralizedAverager._aggregate_with_group = timed  # type: ignore[method-assign]


def drain_rounds() -> list[dict[str, Any]]:
    """Rounds reported since the last call (oldest first)."""
    found: list[dict[str, Any]] = []
    if _ROUNDS is None:
        return found
    try:
        while not _ROUNDS.empty():
            found.append(_ROUNDS.get())
    except (OSError, EOFError, queue.Empty):  # the queue's pipe closed at shutdown
        pass
    return found


class CallProbe:
    """Records ``(name, start, end)`` of wrapped calls (wall clock)."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, float, float]] = []

    def wrap(self, owner: Any, attribute: str, name: str | None = None) -> None:
        """Replace ``owner.attribute`` (a bound method) by a timed wrapper."""
        original: Callable[..., Any] = getattr(owner, attribute)
        label = name or attribute
        spans = self.spans

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.time()
            try:
                return original(*args, **kwargs)
            finally:
                spans.append((label, started, time.time()))

        setattr(owner, attribute, timed)

    def take(self) -> list[tuple[str, float, float]]:
        """Spans recorded since the last call."""
        taken, self.spans[:] = list(self.spans), []
        return taken
