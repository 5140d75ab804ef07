"""Every timeout of a collaborative step, derived in one place from the three settings a user controls."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RoundTimeouts:
    """How long each part of a collaborative step may take (seconds).

    Args:
        matchmaking: how long a group waits for expected peers that are missing (``matchmaking_time``).
        averaging: how long an all-reduce may take once the group formed (``averaging_timeout``).
        request: one request to another peer (hivemind's ``request_timeout``).
        chunk: the per-chunk timeout of a state download (hivemind's ``next_chunk_timeout``); default
            :attr:`round`, since a serving peer answers only after its current step.
    """

    matchmaking: float
    averaging: float
    request: float
    chunk: float | None = None

    @property
    def matchmaking_window(self) -> float:
        """Forming a group, with a request's round trip at each end: the bound on waiting for a group."""
        return self.matchmaking + 2 * self.request

    @property
    def round(self) -> float:
        """A whole round (matchmaking plus all-reduce): the bound on one collaborative step's averaging, and how
        long a peer that took a step may have to wait before every peer of that round has taken it too."""
        return self.matchmaking_window + self.averaging

    @property
    def state_chunk(self) -> float:
        """The per-chunk timeout of a state download."""
        return self.round if self.chunk is None else self.chunk

    @property
    def download(self) -> float:
        """A whole state download: the serving peer's current step plus the transfer."""
        return self.state_chunk + self.averaging


__all__ = ["RoundTimeouts"]
