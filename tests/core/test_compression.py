"""Every compression setting we expose really averages (hivemind's 8-bit codecs silently fail under numpy 2.4)."""

from __future__ import annotations

import hivemind
import pytest
import torch
from hivemind.utils import get_dht_time

from collab_core.averager import CollaborativeAverager
from collab_core.settings import COMPRESSION_CLASSES, CollaborativeSettings

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


@pytest.fixture(scope="module")
def two_dhts():
    first = hivemind.DHT(host_maddrs=LOOPBACK, start=True)
    second = hivemind.DHT(host_maddrs=LOOPBACK, initial_peers=first.get_visible_maddrs(), start=True)
    yield first, second
    second.shutdown()
    first.shutdown()


@pytest.mark.parametrize("name", sorted(COMPRESSION_CLASSES))
def test_compression_setting_averages(two_dhts, name):
    compression = CollaborativeSettings(compression=name).make_compression()
    torch.manual_seed(0)
    inputs = [torch.randn(50_000), torch.randn(50_000) + 1.0]
    weights = [1.0, 3.0]
    expected = (inputs[0] * weights[0] + inputs[1] * weights[1]) / sum(weights)
    averagers = [
        CollaborativeAverager(
            [tensor.clone()],
            dht,
            prefix=f"compression_{name.replace('-', '_')}",
            state_provider=lambda: ({}, []),
            compression=compression,
            min_matchmaking_time=2.0,
            request_timeout=1.0,
        )
        for tensor, dht in zip(inputs, two_dhts, strict=True)
    ]
    try:
        for averager in averagers:
            averager.prepare_round(step=0, group_size=2, timeout=10)
        controls = [
            averager.step(
                weight=weight, wait=False, allow_retries=False, timeout=8, scheduled_time=get_dht_time() + 2.0
            )
            for averager, weight in zip(averagers, weights, strict=True)
        ]
        for control in controls:
            control.result(timeout=30)  # a round that lost data raises PartialAllreduceError here
        spread = (inputs[0] - expected).abs().mean().item()
        for averager in averagers:
            with averager.get_tensors() as (result,):
                error = (result - expected).abs().mean().item()
            print(f"{name}: mean |result - weighted mean| = {error:.2e} (inputs are {spread:.2f} away)")
            tolerance = 1e-6 if name == "none" else 0.1 * spread
            assert error <= tolerance
    finally:
        for averager in averagers:
            averager.shutdown()
