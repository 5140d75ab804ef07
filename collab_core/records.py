"""What one peer publishes about its progress, as plain data (no torch, no network: the planner reads only this)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PeerRecord:
    """One peer's published progress.

    Attributes:
        peer_id: the peer's DHT id (bytes).
        step: the collaborative step it is on (steps it has taken).
        samples: samples it accumulated toward that step.
        samples_per_second: its reported training speed.
        time: when it published this record (DHT time).
        client_mode: whether it accepts no incoming connections (it cannot serve its state).
        fingerprint: a digest of its state's history (see :mod:`collab_core.fingerprint`); ``""`` if it publishes
            none (a peer of another version, or a forged record). Peers at one step with different fingerprints
            hold different states: a fork.
    """

    peer_id: bytes
    step: int
    samples: int
    samples_per_second: float
    time: float
    client_mode: bool
    fingerprint: str = ""


__all__ = ["PeerRecord"]
