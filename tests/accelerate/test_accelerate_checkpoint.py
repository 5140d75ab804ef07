"""Requirement 7: ``accelerator.save_state``/``load_state`` keep the collaborative step, optimizer and scheduler."""

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
from tests.support.accelerate_replay import plain_loop_learning_rates
from tests.support.processes import bootstrap_dht, collab_env

TARGET = 32  # = the data set: every epoch is one collaborative step of a peer alone, so resuming sees the same data


def _momentum(optimizer) -> list[torch.Tensor]:
    return [optimizer.state[p]["momentum_buffer"].clone() for p in optimizer.param_groups[0]["params"]]


def test_resumed_peer_continues_from_its_step_like_an_uninterrupted_run(dht, run_id, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    accelerator = Accelerator()
    model, optimizer, scheduler = collaborative_peer(accelerator, dht, run_id, TARGET)
    model, optimizer, data, scheduler = accelerator.prepare(model, optimizer, loader(TARGET, 8), scheduler)
    first = train(accelerator, model, optimizer, scheduler, data, updates=2)
    accelerator.save_state(str(checkpoint))
    saved = {"params": first.params, "momentum": _momentum(optimizer), "lr": optimizer.param_groups[0]["lr"]}
    optimizer.shutdown()

    reset_accelerate_state()
    accelerator = Accelerator()
    model, optimizer, scheduler = collaborative_peer(accelerator, dht, run_id, TARGET)  # same run, a fresh process
    model, optimizer, data, scheduler = accelerator.prepare(model, optimizer, loader(TARGET, 8), scheduler)
    assert optimizer.collaborative_step == 0
    accelerator.load_state(str(checkpoint))
    try:
        assert optimizer.collaborative_step == 2
        assert scheduler.last_epoch == 2 and optimizer.param_groups[0]["lr"] == saved["lr"]
        assert max_diff([p.detach() for p in model.parameters()], saved["params"]) == 0.0
        assert max_diff(_momentum(optimizer), saved["momentum"]) == 0.0
        resumed = train(accelerator, model, optimizer, scheduler, data, updates=2)
        assert optimizer.collaborative_step == 4 and scheduler.last_epoch == 4
    finally:
        optimizer.shutdown()

    reset_accelerate_state()
    uninterrupted = plain_accelerate(Accelerator(gradient_accumulation_steps=TARGET // 8), loader(TARGET, 8), 4)
    assert max_diff(resumed.params, uninterrupted.params) <= 1e-6
    assert first.lrs + resumed.lrs == pytest.approx(uninterrupted.lrs, rel=1e-12)


@pytest.mark.slow
def test_resumed_peer_downloads_when_the_collaboration_moved_on(tmp_path):
    """``a`` trains alone to step 2 and saves; later it resumes while ``b`` is already at step 5 or beyond: it starts
    at step 2, downloads the collaboration's state, and ends identical to ``b`` with the right learning rate."""
    checkpoint, steps = tmp_path / "checkpoint", 10
    common = [
        "--batch-size",
        "8",
        "--steps",
        str(steps),
        "--checkpoint-dir",
        str(checkpoint),
        "--compute-seconds",
        "0.02",
    ]
    settings = {"target_batch_size": 64, "averaging_timeout": 20, "matchmaking_time": 3}
    (tmp_path / "first").mkdir()
    with bootstrap_dht() as dht, LaunchedPeers(tmp_path / "first", collab_env(dht, "acc-resume", **settings)) as peers:
        first = peers.start("a", [*common, "--data-seed", "1", "--save-state-at", "2"], launcher="python")
        peers.wait([first], timeout=120)
    (tmp_path / "second").mkdir()
    with bootstrap_dht() as dht, LaunchedPeers(tmp_path / "second", collab_env(dht, "acc-resume", **settings)) as peers:
        b = peers.start("b", [*common, "--data-seed", "2", "--peers", "2"], launcher="python")
        a = peers.start("a", [*common, "--data-seed", "1", "--peers", "2", "--resume", "--join-at-step", "5"])
        peers.wait([a, b], timeout=180)
        a_result, b_result = a.results()[0], b.results()[0]
    assert a_result["step_after_resume"] == 2
    assert a_result["collaboration_state"]["state_downloads"] >= 1
    assert a_result["calls"][0]["downloaded"]  # its first step() found the collaboration >1 step ahead
    assert a_result["collaborative_step"] == b_result["collaborative_step"] == steps
    assert max_diff(a_result["final_params"], b_result["final_params"]) <= 1e-6
    expected = plain_loop_learning_rates(steps)
    assert a_result["final_lr"] == pytest.approx(expected[steps], rel=1e-12)
    assert a_result["scheduler_state"]["last_epoch"] == steps
    for step, lr in a_result["lrs_used"].items():
        assert lr == pytest.approx(expected[step], rel=1e-12)
