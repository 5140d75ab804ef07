"""``collab_core.join``: one join sequence for every integration, choosing the optimizer by ``algorithm``."""

from __future__ import annotations

import warnings

import pytest
import torch

from collab_core import CollaborativeAdaptiveOptimizer, CollaborativeOptimizer, CollaborativeSettings
from collab_core.join import join

pytestmark = pytest.mark.timeout(60)


def _settings(**values) -> CollaborativeSettings:
    return CollaborativeSettings.resolve(
        env={}, run_id="join", target_batch_size=64, host_maddrs=["/ip4/127.0.0.1/tcp/0"], **values
    )


def _optimizer(kind=torch.optim.Adam) -> torch.optim.Optimizer:
    return kind(torch.nn.Linear(3, 2).parameters(), lr=0.1)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({}, CollaborativeOptimizer),
        ({"algorithm": "gradient"}, CollaborativeOptimizer),
        ({"algorithm": "adaptive", "average_opt_statistics": ["exp_avg_sq"]}, CollaborativeAdaptiveOptimizer),
        ({"algorithm": "adaptive"}, CollaborativeAdaptiveOptimizer),  # parameters only
    ],
)
def test_algorithm_selects_the_optimizer_and_close_leaves_nothing_running(values, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # an explicit algorithm never warns
        membership = join(_optimizer(), _settings(**values), print_hint=False)
    try:
        assert type(membership.optimizer) is expected
        assert membership.owns_dht and membership.dht.is_alive()
        assert "COLLAB_INITIAL_PEERS" in membership.join_hint
    finally:
        membership.close()
    assert not membership.dht.is_alive()
    assert membership.optimizer.state_dict()["local_step"] == 0  # still readable after close (checkpoints)


def test_statistics_without_algorithm_still_select_adaptive_with_a_warning():
    with pytest.warns(FutureWarning, match="algorithm: adaptive"):
        membership = join(_optimizer(), _settings(average_opt_statistics=["exp_avg_sq"]), print_hint=False)
    try:
        assert isinstance(membership.optimizer, CollaborativeAdaptiveOptimizer)
        assert membership.optimizer.average_opt_statistics == ("exp_avg_sq",)
    finally:
        membership.close()


def test_a_failed_optimizer_construction_shuts_the_dht_down():
    settings = _settings(algorithm="adaptive", average_opt_statistics=["no_such_statistic"])
    with pytest.raises(ValueError, match="no_such_statistic"):
        join(_optimizer(), settings, print_hint=False)
