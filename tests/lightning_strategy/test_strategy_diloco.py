"""``Trainer(strategy="collaborative")`` in DiLoCo mode, switched by ``COLLAB_ALGORITHM=diloco`` alone.

Two real Trainers (separate OS processes): p0 with ``accumulate_grad_batches=2``, p1 without. Each optimizer step of
Lightning is one inner AdamW step; every ``target_batch_size`` samples the peers take the outer step together.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from tests.peers.lightning_peer import lr_factor, make_net
from tests.support.diloco_replay import Factories, replay_diloco
from tests.support.processes import REPO_ROOT, PeerSet, bootstrap_dht, collab_env

LIGHTNING_PEER = REPO_ROOT / "tests" / "peers" / "lightning_peer.py"
STEPS = 4
INNER_LR = 0.01


@pytest.fixture(scope="module")
def diloco_trainers(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lightning_diloco")
    common = ["--peers", "2", "--steps", str(STEPS), "--scheduler", "step", "--inner-optimizer", "adamw"]
    specs = [
        ("p0", [*common, "--batch-size", "16", "--accumulate", "2", "--data-seed", "11"]),
        ("p1", [*common, "--batch-size", "8", "--data-seed", "12"]),
    ]
    settings = dict(algorithm="diloco", target_batch_size=192, averaging_timeout=20, matchmaking_time=3)
    with bootstrap_dht() as dht, PeerSet(workdir, collab_env(dht, "lightning_diloco", **settings)) as peers:
        started = [peers.start(name, args, script=LIGHTNING_PEER) for name, args in specs]
        peers.wait(started, timeout=240)
        return {peer.name: {**peer.result(), "log": peer.log_text()} for peer in started}


def test_the_environment_variable_alone_switches_the_strategy_to_diloco(diloco_trainers):
    for result in diloco_trainers.values():
        assert result["optimizer_class"] == "DiLoCoOptimizer"
        assert result["collaborative_step"] == STEPS


def test_one_inner_step_per_optimizer_step_and_accumulate_grad_batches(diloco_trainers):
    """Semantics 3: with ``accumulate_grad_batches=2`` one inner step per 2 micro-batches."""
    for name, result in diloco_trainers.items():
        inner_steps = {int(v) for k, v in result["final_optimizer_state"].items() if k.endswith(".step")}
        assert inner_steps == {result["global_step"]}, name  # every Lightning optimizer step is one inner step
    p0 = diloco_trainers["p0"]
    assert len(p0["batches"]) == 2 * p0["global_step"]
    assert p0["global_step"] > 2 * STEPS, "several inner steps per outer step"


def test_outer_steps_equal_the_single_process_simulation_and_replicas_agree(diloco_trainers):
    factories = Factories(
        model=make_net,
        inner=partial(torch.optim.AdamW, lr=INNER_LR, weight_decay=0.01),
        scheduler=partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=lr_factor),
    )
    global_params, _outer = replay_diloco(
        diloco_trainers, STEPS, factories=factories, batches_key="batches", accumulate={"p0": 2}
    )
    for result in diloco_trainers.values():
        diff = max(
            (a - b).abs().max().item() for a, b in zip(result["per_step"][STEPS]["params"], global_params, strict=True)
        )
        print(f"{result['name']}: max |peer - single-process DiLoCo simulation| = {diff:.3e}")
        assert diff <= 1e-5
    a, b = diloco_trainers["p0"], diloco_trainers["p1"]
    for step in set(a["per_step"]) & set(b["per_step"]):
        for key in ("params", "global_params"):
            pairs = zip(a["per_step"][step][key], b["per_step"][step][key], strict=True)
            assert max((x - y).abs().max().item() for x, y in pairs) <= 1e-6


def test_scheduler_advances_once_per_outer_step(diloco_trainers):
    for result in diloco_trainers.values():
        for step, snapshot in result["per_step"].items():
            assert snapshot["lr"] == pytest.approx(INNER_LR * lr_factor(step)), (result["name"], step)
        assert result["scheduler_last_epoch"] == STEPS
    assert not any("solo" in r["log"] for r in diloco_trainers.values())
