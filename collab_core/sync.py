"""State synchronisation: downloading a peer's state with back-off, and deciding whether a served state may load.

The downloads themselves run in the averager process on hivemind's RPC (``load_state_from_peers``); serving is the
averager's state provider (see :class:`collab_core.averager.CollaborativeAverager`). This module waits for a download
as long as it makes progress, shows that progress (:mod:`collab_core.download_watch`), decides from what was served
whether it is a state this peer should load, and paces automatic attempts after failures.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from collab_core.averager import CollaborativeAverager
from collab_core.download_watch import DownloadWatch
from collab_core.log import get_logger

logger = get_logger(__name__)

#: how often a download in progress is looked at (its counters read, a progress line shown when due)
DOWNLOAD_POLL_SECONDS = 1.0


@dataclass(frozen=True)
class ServedState:
    """A state downloaded from a peer (not loaded yet).

    Attributes:
        metadata: the serving peer's metadata (``step``, ``fingerprint``, layout, scheduler state).
        tensors: parameters, then optimizer state tensors.
    """

    metadata: dict[str, Any]
    tensors: Sequence[torch.Tensor]

    @property
    def step(self) -> int | None:
        step = self.metadata.get("step")
        return step if isinstance(step, int) and not isinstance(step, bool) else None

    @property
    def fingerprint(self) -> str:
        fingerprint = self.metadata.get("fingerprint")
        return fingerprint if isinstance(fingerprint, str) else ""


def refusal(served: ServedState, step: int, fingerprint: str, require_newer: bool, wanted: str | None) -> str | None:
    """Why a served state must not be loaded by a peer at ``step`` with ``fingerprint``, or None if it may.

    Args:
        served: what was downloaded.
        step: this peer's step.
        fingerprint: this peer's state fingerprint.
        require_newer: an automatic download: a state at this peer's own step loads only if it is ``wanted``.
        wanted: the fork winner's fingerprint this peer downloads for, if any.
    """
    if served.step is None:
        return "the state served has no step"
    if served.step < step:
        return f"the only state available is older (step {served.step}) than this peer's (step {step})"
    if served.step > step or not require_newer:
        return None
    if wanted is not None and served.fingerprint == wanted:
        return None
    if wanted is not None:
        return f"a peer served state {served.fingerprint or '?'} of step {step}, not the fork's winner {wanted}"
    return f"peers seem to be ahead, but the state they serve is at this peer's own step {step}"


class StateSynchronizer:
    """Downloads states for this peer and paces automatic attempts after a failed one.

    Args:
        averager: the averager that downloads (hivemind picks the serving peer: highest priority first).
        max_backoff: the longest pause between automatic attempts (seconds); by then records of crashed peers
            have expired.
        min_backoff: the first pause after a failure (seconds).
        prefix: the run's name, for log lines.
    """

    def __init__(self, averager: CollaborativeAverager, *, max_backoff: float, min_backoff: float, prefix: str):
        self.averager = averager
        self.max_backoff, self.min_backoff, self.prefix = max_backoff, min_backoff, prefix
        self.backoff = 0.0  # seconds to wait after the last failed automatic download (doubles, capped)
        self.next_attempt_at = 0.0  # time.monotonic() before which no automatic download is tried
        self.downloads = 0

    def may_download(self) -> bool:
        """Whether an automatic download may be tried now."""
        return time.monotonic() >= self.next_attempt_at

    def retry_at_dht_time(self, now_dht: float) -> float:
        """When (DHT time) the next automatic attempt is allowed."""
        return now_dht + max(0.0, self.next_attempt_at - time.monotonic())

    def fetch(self, timeout: float) -> ServedState | None:
        """Download some peer's state (hivemind's choice of peer); None if no peer served one.

        Args:
            timeout: give up when the download made no progress (no byte received, no other serving peer tried)
                for this many seconds. There is no bound on the whole transfer: a large state on a slow link takes
                its size over the bandwidth, and that is shown (a line every few seconds) instead of cut off.
        """
        watch = DownloadWatch(timeout, time.monotonic(), self.averager.download_progress())
        try:
            future = self.averager.load_state_from_peers(wait=False, timeout=timeout)
            while True:
                try:
                    downloaded = future.result(timeout=DOWNLOAD_POLL_SECONDS)
                    break
                except TimeoutError:
                    pass
                verdict = watch.observe(time.monotonic(), self.averager.download_progress())
                if verdict.line is not None:
                    logger.info(f"{self.prefix}: {verdict.line}")
                if verdict.stalled:
                    future.cancel()
                    logger.warning(
                        f"{self.prefix}: the state download made no progress for {timeout:.0f}s; giving up on it"
                    )
                    return None
        except Exception as e:
            logger.warning(f"{self.prefix}: could not download the state from peers: {e!r}")
            return None
        if downloaded is None:
            return None
        metadata, tensors = downloaded
        if not isinstance(metadata, dict):
            return None
        if watch.reported:
            received = sum(tensor.numel() * tensor.element_size() for tensor in tensors)
            logger.info(f"{self.prefix}: {watch.summary(time.monotonic(), received)}")
        return ServedState(metadata, tensors)

    def succeeded(self) -> None:
        """A state was loaded: attempts are no longer paced."""
        self.downloads += 1
        self.backoff, self.next_attempt_at = 0.0, 0.0

    def failed(self, reason: str) -> None:
        """An attempt failed: pause automatic attempts (doubling, capped).

        Without a back-off, a peer whose view shows peers ahead (e.g. records of crashed peers, which live until
        they expire) would retry at every step() and discard every micro-batch meanwhile.
        """
        self.backoff = min(max(2 * self.backoff, self.min_backoff), self.max_backoff)
        self.next_attempt_at = time.monotonic() + self.backoff
        logger.warning(
            f"{self.prefix}: {reason}; continuing from the local state, next automatic download attempt in "
            f"{self.backoff:.0f}s"
        )


__all__ = ["ServedState", "StateSynchronizer", "refusal"]
