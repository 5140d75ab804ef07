"""What one peer publishes about its progress, as plain data (no torch, no network: the planner reads only this)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


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


def parse_dictionary_entries(entries: Any, parse: Callable[[Any], T]) -> tuple[list[T], list[str]]:
    """Parse the values of a DHT dictionary value (``{subkey: value}``, as ``dht.get`` returns it).

    Pure: withdrawn entries (``None``) are left out; a value ``parse`` raises on is skipped with the reason
    ``"malformed (<exception type>)"``; anything but a dictionary yields nothing (and a reason unless it is None).

    Args:
        entries: ``{subkey: value}``; a value may be wrapped in an object with a ``.value`` attribute.
        parse: turns one value into a record (e.g. a pydantic schema's ``parse_obj``).

    Returns:
        ``(parsed records, reasons)``: one reason per skipped value.
    """
    if not isinstance(entries, dict):
        return [], ([] if entries is None else [f"not a dictionary ({type(entries).__name__})"])
    parsed: list[T] = []
    skipped: list[str] = []
    for entry in entries.values():
        value = getattr(entry, "value", entry)
        if value is None:
            continue  # withdrawn by a peer that left
        try:
            parsed.append(parse(value))
        except Exception as e:
            skipped.append(f"malformed ({type(e).__name__})")
    return parsed, skipped


__all__ = ["PeerRecord", "parse_dictionary_entries"]
