"""fp16 loss scaling with a collaboration: unscaled once per collaborative step, overflow steps skipped by everyone.

The peers scale their losses with a ``torch.amp.GradScaler`` (fp32 math with a power-of-two scale, so scaling is
exact and the result can be compared with an unscaled single-process replay). One peer makes its gradient infinite
during one collaborative step: no peer may apply that step, and nobody's parameters may see the infinity.
"""

from __future__ import annotations

import pytest
import torch

from collab_core import CollaborativeAdaptiveOptimizer
from collab_core.amp import LossScaleKeeper
from tests.peers.core_peer import make_model, make_optimizer
from tests.support.core_runs import max_diff, peer_spec, run_peers
from tests.support.round_contributions import contributed_batches

STEPS = 6
OVERFLOW_STEP = 2


def _replay_skipping(results: dict, skipped_step: int):
    model = make_model(0)
    opt = make_optimizer("sgd", model.parameters())
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
    for step in range(STEPS):
        if step == skipped_step:
            continue
        batches = [batch for sent in contributed_batches(results, step, "micro_batches").values() for batch in sent]
        opt.zero_grad()
        (sum(loss_fn(model(x), y) for x, y in batches) / sum(len(x) for x, _ in batches)).backward()
        opt.step()
    return model


@pytest.fixture(scope="module", params=[2, 1], ids=["two-peers", "solo"])
def scaled_run(request, tmp_path_factory):
    peers = request.param
    overflow = ["--overflow-at-step", str(OVERFLOW_STEP)]
    specs = [
        peer_spec(
            f"p{i}", 16, 300 + i, STEPS, "--grad-scale", "1024", *(overflow if i == peers - 1 else []), peers=peers
        )
        for i in range(peers)
    ]
    return run_peers(
        tmp_path_factory.mktemp("fp16"),
        f"fp16_{peers}",
        specs,
        target_batch_size=64,
        averaging_timeout=20,
        matchmaking_time=3,
    )


@pytest.mark.slow
def test_overflow_step_is_skipped_by_every_peer(scaled_run):
    for result in scaled_run.values():
        assert result["local_step"] == STEPS
        assert result["collaboration_state"]["overflow_steps"] == 1
        before, after = result["per_step"][OVERFLOW_STEP], result["per_step"][OVERFLOW_STEP + 1]
        assert max_diff(before["params"], after["params"]) == 0.0, "the overflow step changed the parameters"
        assert all(torch.isfinite(p).all() for p in result["final"]["params"])


@pytest.mark.slow
def test_scaled_gradients_are_unscaled_once_per_step(scaled_run):
    replay = _replay_skipping(scaled_run, OVERFLOW_STEP)
    for result in scaled_run.values():
        assert max_diff(result["final"]["params"], list(replay.parameters())) < 1e-5


def _expected_scale(steps_taken, overflow_step: int, scale: float = 1024.0, growth_interval: int = 3) -> float:
    """A GradScaler updated once per collaborative step this peer took itself (a step it got by a download does not
    update its scaler): halved at the overflow step, doubled after ``growth_interval`` clean ones in a row."""
    clean = 0
    for step in sorted(steps_taken):
        if step == overflow_step:
            scale, clean = scale / 2, 0
            continue
        clean += 1
        if clean == growth_interval:
            scale, clean = scale * 2, 0
    return scale


def test_expected_scale_follows_the_steps_a_peer_took():
    assert _expected_scale(range(6), 2) == 1024.0  # 0,1 clean; 2 overflows (512); 3,4,5 clean (1024)
    assert _expected_scale([0, 1, 2, 3, 4], 2) == 512.0  # step 5 came by a download (a round broke on this side)


@pytest.mark.slow
def test_loss_scale_backs_off_and_grows_per_collaborative_step(scaled_run):
    # growth_interval=3: steps 0,1 clean; step 2 overflows (1024 -> 512); steps 3,4,5 clean (512 -> 1024) on a peer
    # that took them all itself. Had the scale moved per micro-batch (4 per step at this target), it would have grown
    # several times instead.
    for result in scaled_run.values():
        assert result["scale"] == _expected_scale(result["contributions"], OVERFLOW_STEP), result["contributions"]


def test_loss_scale_keeper_rejects_a_non_scaler():
    with pytest.raises(ValueError, match="grad_scaler must be a torch.amp.GradScaler"):
        LossScaleKeeper(object())


def test_loss_scale_keeper_zeroes_non_finite_gradients():
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    keeper = LossScaleKeeper(scaler)
    finite = [torch.tensor([8.0, 4.0])]
    assert keeper.unscale_(finite) and torch.equal(finite[0], torch.tensor([2.0, 1.0]))
    broken = [torch.tensor([8.0, float("nan")]), torch.tensor([1.0])]
    assert not keeper.unscale_(broken)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in broken)


def test_adaptive_optimizer_refuses_fp16_scaler():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="bf16"):
        CollaborativeAdaptiveOptimizer(
            torch.optim.Adam(model.parameters()),
            average_opt_statistics=["exp_avg_sq"],
            grad_scaler=torch.amp.GradScaler("cpu"),
            dht=None,
            prefix="x",
            target_batch_size=4,
        )
