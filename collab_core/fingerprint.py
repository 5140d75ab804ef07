"""State fingerprints: a short digest of a replica's history that changes with every update it applies.

Honest replicas are equal only up to float rounding (hivemind hands each peer ``average - local`` and every peer adds
it to its own values), so a fingerprint cannot hash parameter bytes after a round. It is derived instead from what
the peers of a round agree on exactly: the fingerprint they all had before it, the step, and every member's sample
count from the round's gathered data. Peers that took a step together therefore hold the same fingerprint, and a
peer that took the step another way (alone, or in another group) holds a different one.

Parameter bytes are hashed only where there is no history to agree on: a peer's initial model and a checkpoint that
carries no fingerprint. Peers that start from the same seed get the same fingerprint; peers that do not are a fork
from the start, and one side downloads the other's state (see :mod:`collab_core.planner`).

Pure functions, no networking.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import torch

#: hex digits in a fingerprint (64 bits)
FINGERPRINT_LENGTH = 16
#: bits of the fingerprint put into the matchmaking key: replicas of different states never average together
FINGERPRINT_KEY_BITS = 16


def _hasher() -> hashlib.blake2b:
    return hashlib.blake2b(digest_size=FINGERPRINT_LENGTH // 2)


@torch.no_grad()
def tensors_fingerprint(tensors: Iterable[torch.Tensor], *, step: int = 0) -> str:
    """The fingerprint of a state with no shared history: a digest of ``step`` and the tensors' bytes and shapes."""
    hasher = _hasher()
    hasher.update(f"tensors:{int(step)}".encode())
    for tensor in tensors:
        value = tensor.detach().to("cpu").contiguous()
        hasher.update(f"{value.dtype}{tuple(value.shape)}".encode())
        hasher.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return hasher.hexdigest()


def next_fingerprint(previous: str, step: int, contributions: Mapping[bytes, int]) -> str:
    """The fingerprint after collaborative step ``step`` was applied from a round with these contributions.

    Args:
        previous: the fingerprint every member had before the round.
        step: the step the round applied (the one the members were on).
        contributions: samples each member contributed, by peer id (the round's gathered data, which every member
            received identically). A step taken alone has one entry.
    """
    hasher = _hasher()
    hasher.update(f"{previous}:{int(step)}".encode())
    for peer_id, samples in sorted(contributions.items()):
        hasher.update(peer_id)
        hasher.update(f":{int(samples)};".encode())
    return hasher.hexdigest()


def fingerprint_key_bits(fingerprint: str) -> str:
    """The fingerprint's first ``FINGERPRINT_KEY_BITS`` bits as a string of 0/1 (for the matchmaking group key)."""
    digits = FINGERPRINT_KEY_BITS // 4
    value = int(fingerprint[:digits], 16) if is_fingerprint(fingerprint) else 0
    return format(value, f"0{FINGERPRINT_KEY_BITS}b")


def is_fingerprint(value: object) -> bool:
    """Whether ``value`` is a well-formed fingerprint (what peers of this version publish)."""
    return isinstance(value, str) and len(value) == FINGERPRINT_LENGTH and all(c in "0123456789abcdef" for c in value)


__all__ = [
    "FINGERPRINT_LENGTH",
    "FINGERPRINT_KEY_BITS",
    "tensors_fingerprint",
    "next_fingerprint",
    "fingerprint_key_bits",
    "is_fingerprint",
]
