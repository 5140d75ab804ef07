"""A start barrier over the DHT: peers wait until all of them are in, instead of sleeping (tests and benchmarks)."""

from __future__ import annotations

import time
from typing import Any

from hivemind.utils import get_dht_time

BARRIER_TIMEOUT = 120.0


def barrier(dht: Any, key: str, name: str, expected: int, timeout: float = BARRIER_TIMEOUT) -> None:
    """Wait until ``expected`` peers stored themselves under ``key`` (a DHT record per peer)."""
    dht.store(key, subkey=name, value=True, expiration_time=get_dht_time() + 600)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = dht.get(key, latest=True)
        if found is not None and isinstance(found.value, dict) and len(found.value) >= expected:
            return
        time.sleep(0.02)
    raise TimeoutError(f"barrier {key}: fewer than {expected} peers arrived within {timeout}s")
