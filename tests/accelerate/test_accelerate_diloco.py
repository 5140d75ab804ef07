"""Accelerate in DiLoCo mode from its config file alone (``algorithm: diloco`` in ``collab.yaml``), one real peer in
this process: every sync step of ``accelerator.accumulate`` is one inner AdamW step, every ``target_batch_size``
samples an outer Nesterov SGD step, the same updates as a plain DiLoCo loop."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from accelerate_collab import CollaborativeConfig, prepare_collaborative
from collab_core import DiLoCoOptimizer
from tests.peers.accelerate_peer import make_model, make_scheduler
from tests.support.accelerate_inprocess import loader, max_diff, train
from tests.support.accelerate_launching import LaunchedPeers
from tests.support.processes import LOOPBACK, bootstrap_dht, collab_env

BATCH, ACCUMULATION, SAMPLES = 8, 2, 64
INNER_STEPS = SAMPLES // (BATCH * ACCUMULATION)  # per outer step: the target is one pass over the data
OUTER_STEPS = 3


def _adamw(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=0.01, weight_decay=0.01)


def _plain_diloco_loop() -> list[list[torch.Tensor]]:
    """Plain PyTorch: AdamW on the mean gradient of 2 micro-batches, an outer step every INNER_STEPS inner steps."""
    model = make_model(0)
    inner = _adamw(model.parameters())
    scheduler = make_scheduler(inner)
    global_params = [p.detach().clone() for p in model.parameters()]
    outer = torch.optim.SGD(global_params, lr=0.7, momentum=0.9, nesterov=True)
    after_outer_steps = []
    for _ in range(OUTER_STEPS):
        batches = list(loader(SAMPLES, BATCH))
        for start in range(0, len(batches), ACCUMULATION):
            for _, x, y in batches[start : start + ACCUMULATION]:
                (torch.nn.functional.cross_entropy(model(x), y) / ACCUMULATION).backward()
            inner.step()
            inner.zero_grad()
        for g, p in zip(global_params, model.parameters(), strict=True):
            g.grad = g.detach() - p.detach()
        outer.step()
        with torch.no_grad():
            for g, p in zip(global_params, model.parameters(), strict=True):
                p.copy_(g)
        scheduler.step()
        after_outer_steps.append([p.detach().clone() for p in model.parameters()])
    return after_outer_steps


@pytest.mark.timeout(120)
def test_diloco_from_the_config_file_alone_matches_a_plain_diloco_loop(tmp_path, dht, run_id):
    path = tmp_path / "collab.yaml"
    path.write_text(f"run_id: {run_id}\ntarget_batch_size: {SAMPLES}\nhost_maddrs: [{LOOPBACK}]\nalgorithm: diloco\n")
    accelerator = Accelerator(gradient_accumulation_steps=ACCUMULATION)
    model = make_model(0)
    inner = _adamw(model.parameters())
    optimizer, scheduler = prepare_collaborative(
        accelerator,
        inner,
        make_scheduler(inner),
        config=CollaborativeConfig.from_yaml(path, env={}),
        dht=dht,
        progress_bar=False,
    )
    assert isinstance(optimizer.collaborative_optimizer, DiLoCoOptimizer)
    model, optimizer, data, scheduler = accelerator.prepare(model, optimizer, loader(SAMPLES, BATCH), scheduler)
    try:
        trained = train(accelerator, model, optimizer, scheduler, data, updates=OUTER_STEPS)
        assert optimizer.collaborative_step == OUTER_STEPS
        # one inner step per sync step (ACCUMULATION micro-batches), never more
        inner_steps = {int(state["step"]) for state in inner.state.values()}
        assert inner_steps == {OUTER_STEPS * INNER_STEPS}
        assert len(trained.skipped) == OUTER_STEPS * INNER_STEPS * ACCUMULATION
        expected = _plain_diloco_loop()
        for step, (got, want) in enumerate(zip(trained.params_after_update, expected, strict=True)):
            diff = max_diff(got, want)
            assert diff <= 1e-6, (step, diff)
        assert trained.lrs == pytest.approx([0.01 / (1 + k) for k in range(OUTER_STEPS)])
    finally:
        optimizer.shutdown()


@pytest.mark.timeout(240)
def test_two_local_processes_follow_every_inner_step(tmp_path):
    """``accelerate launch --num_processes 2`` with ``COLLAB_ALGORITHM=diloco``: the main process takes the inner
    steps; the other process receives the parameters after every one of them (not only at outer steps), so both
    train the same replica (their forward passes use the same weights)."""
    with bootstrap_dht() as dht:
        env = collab_env(dht, "acc-diloco", target_batch_size=64, algorithm="diloco", averaging_timeout=20)
        with LaunchedPeers(tmp_path, env) as peers:
            args = ["--peers", "1", "--steps", "3", "--samples", "64", "--batch-size", "4", "--data-seed", "1"]
            peer = peers.start("solo", args, num_processes=2)
            peers.wait([peer], timeout=200)
            main, follower = peer.results()
    assert main["collaboration_state"]["optimizer_step"] == 3
    sync_calls = [call for call in main["calls"] if call["sync"]]
    assert len(sync_calls) == 3 * 8 and all(call["params_changed"] for call in sync_calls)  # 8 inner steps each
    assert [c["params_changed"] for c in follower["calls"]] == [c["params_changed"] for c in main["calls"]]
    assert max_diff(main["final_params"], follower["final_params"]) == 0
