"""One averaging round: an all-reduce of the averager's buffers with the peers of one step, and its typed outcome.

The round only averages; what is in the buffers and what is done with the result is the averaging scheme's job
(:mod:`collab_core.schemes`), and what to do after an outcome is the planner's (:mod:`collab_core.planner`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hivemind.averaging.control import AveragingStage, StepControl
from hivemind.utils import get_dht_time

from collab_core.averager import CollaborativeAverager
from collab_core.records import PeerRecord
from collab_core.timeouts import RoundTimeouts

#: while a group is forming, check this often whether the other peers already took the step (seconds)
ROUND_POLL_INTERVAL = 0.25


class RoundStatus(Enum):
    """How a round ended."""

    COMPLETED = "completed"  #: every member has the same average of all members' buffers: apply it
    MISSED = "missed"  #: while the group was forming, other peers took the step without this peer
    NO_GROUP = "no group"  #: no group formed (nobody expected came in time)
    BROKE = "broke"  #: the all-reduce began and failed here; some members may have applied it
    MIXED_STEPS = "mixed steps"  #: the group held peers at other steps (never applied)
    MIXED_STATES = "mixed states"  #: the group held replicas of different states (never applied)
    SHORT = "short"  #: the group gathered fewer than the target's samples (never applied)


@dataclass(frozen=True)
class RoundOutcome:
    """The result of :meth:`AveragingRound.run`.

    Attributes:
        status: how it ended.
        step: the collaborative step it was for.
        gathered: for a round whose group formed: each member's gathered data (``step``, ``samples``,
            ``fingerprint``), by peer id; identical on every member.
        error: the exception that ended a failed round, if any.
        seconds: how long the round took.
    """

    status: RoundStatus
    step: int
    gathered: Mapping[bytes, Mapping[str, Any]] = field(default_factory=dict)
    error: BaseException | None = None
    seconds: float = 0.0

    @property
    def applies(self) -> bool:
        """Whether the members apply the averaged buffers."""
        return self.status is RoundStatus.COMPLETED

    @property
    def contributions(self) -> dict[bytes, int]:
        """Samples each member contributed (0 for a malformed entry)."""
        return {peer_id: sample_count(info) for peer_id, info in self.gathered.items()}


def sample_count(info: Any) -> int:
    """The sample count a groupmate reported in the round's gathered data (0 if missing or malformed)."""
    samples = info.get("samples") if isinstance(info, Mapping) else None
    return samples if isinstance(samples, int) and not isinstance(samples, bool) and samples > 0 else 0


class AveragingRound:
    """Runs one all-reduce per call through a :class:`~collab_core.averager.CollaborativeAverager`.

    Args:
        averager: the averager whose buffers are averaged in place.
        timeouts: the step's timeouts.
        target_batch_size: a round that gathered fewer samples is ``SHORT`` (unless ``group_size_cap`` is set:
            then a group is meant to hold only part of the collaboration).
        group_size_cap: the largest group to form (hivemind's ``target_group_size``), or None.
    """

    def __init__(
        self,
        averager: CollaborativeAverager,
        timeouts: RoundTimeouts,
        target_batch_size: int,
        group_size_cap: int | None = None,
    ):
        self.averager = averager
        self.timeouts = timeouts
        self.target_batch_size = target_batch_size
        self.group_size_cap = group_size_cap

    def run(
        self,
        step: int,
        samples: int,
        fingerprint: str,
        group: Sequence[PeerRecord],
        others_took_step: Callable[[], bool],
    ) -> RoundOutcome:
        """Average with the peers of ``group`` (the buffers must already hold this peer's part).

        Args:
            step: this peer's collaborative step (part of the matchmaking key).
            samples: samples this peer contributes (its weight).
            fingerprint: this peer's state fingerprint (part of the matchmaking key; checked in the gathered data).
            group: the peers expected (the group closes once this many are in).
            others_took_step: polled while the group forms; True ends the round as ``MISSED``.

        Returns:
            The outcome; only ``COMPLETED`` leaves averaged values that may be applied. Never raises for a failed
            round; a ``KeyboardInterrupt`` or ``SystemExit`` propagates.
        """
        started = time.perf_counter()
        group_size = len(group) if self.group_size_cap is None else min(len(group), self.group_size_cap)
        control: StepControl | None = None

        def outcome(status: RoundStatus, **kwargs: Any) -> RoundOutcome:
            return RoundOutcome(status, step, seconds=time.perf_counter() - started, **kwargs)

        try:
            self.averager.prepare_round(step, group_size, timeout=self.timeouts.averaging, fingerprint=fingerprint)
            control = self.averager.step(
                gather=dict(step=step, samples=samples, fingerprint=fingerprint),
                weight=float(samples),
                scheduled_time=get_dht_time() + self.timeouts.matchmaking,
                timeout=self.timeouts.matchmaking_window,
                allow_retries=False,
                wait=False,
            )
            result = self._wait(control, others_took_step)
            if result is None:
                control.cancel()
                return outcome(RoundStatus.MISSED)
        except BaseException as e:
            if control is not None and not control.done():
                control.cancel()
            # hivemind cancels a step's future from inside the averager (e.g. when matchmaking is torn down), and
            # result() then raises asyncio.CancelledError, a BaseException: that is a failed round, not an interrupt
            if not isinstance(e, (Exception, asyncio.CancelledError)):
                raise
            began = control is not None and control.began_allreduce
            return outcome(RoundStatus.BROKE if began else RoundStatus.NO_GROUP, error=e)

        gathered = {peer_id.to_bytes(): info for peer_id, info in result.items()}
        status = self.classify(gathered, step, fingerprint)
        return outcome(status, gathered=gathered)

    def classify(self, gathered: Mapping[bytes, Any], step: int, fingerprint: str) -> RoundStatus:
        """The status of a round whose group formed and whose all-reduce completed, from its gathered data.

        Every member sees the same gathered data, so every member reaches the same verdict.
        """
        infos = [info if isinstance(info, Mapping) else {} for info in gathered.values()]
        if {info.get("step") for info in infos} != {step}:
            return RoundStatus.MIXED_STEPS
        if {info.get("fingerprint") for info in infos} != {fingerprint}:
            return RoundStatus.MIXED_STATES
        if self.group_size_cap is None and sum(sample_count(info) for info in infos) < self.target_batch_size:
            return RoundStatus.SHORT
        return RoundStatus.COMPLETED

    def _wait(self, control: StepControl, others_took_step: Callable[[], bool]) -> dict[Any, Any] | None:
        """The round's gathered data; None if, while the group was still forming, other peers took the step."""
        deadline = time.perf_counter() + self.timeouts.round
        while True:
            try:
                return control.result(timeout=max(0.0, min(ROUND_POLL_INTERVAL, deadline - time.perf_counter())))
            except (TimeoutError, FutureTimeoutError):  # distinct classes before Python 3.11
                if time.perf_counter() >= deadline:
                    raise
            if control.stage == AveragingStage.LOOKING_FOR_GROUP:
                try:
                    if others_took_step():
                        return None
                except (TimeoutError, FutureTimeoutError):
                    pass


__all__ = ["AveragingRound", "RoundOutcome", "RoundStatus", "sample_count", "ROUND_POLL_INTERVAL"]
