"""Fixtures for the in-process Accelerate tests: a fresh Accelerator per test, one DHT node for all of them."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import hivemind
import pytest

from tests.support.accelerate_inprocess import reset_accelerate_state
from tests.support.processes import LOOPBACK

_run_ids = itertools.count()


@pytest.fixture(autouse=True)
def fresh_accelerate_state() -> Iterator[None]:
    reset_accelerate_state()
    yield
    reset_accelerate_state()


@pytest.fixture(scope="module")
def dht() -> Iterator[hivemind.DHT]:
    """One DHT node on loopback for the in-process peers of a module (each test uses its own run id)."""
    node = hivemind.DHT(host_maddrs=[LOOPBACK], start=True)
    yield node
    node.shutdown()


@pytest.fixture
def run_id() -> str:
    return f"acc-inproc-{next(_run_ids)}"
