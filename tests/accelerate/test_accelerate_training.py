"""The Accelerate wrapper with one real peer in this process: what the training loop sees and the updates it makes.

A peer alone with ``target_batch_size = T`` must make exactly the updates of a plain Accelerate loop that accumulates
``T`` samples per optimizer step; that is the reference for accumulation, ``zero_grad`` and mixed-precision modes.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from accelerate_collab import (
    CollaborativeAcceleratedOptimizer,
    CollaborativeAcceleratedScheduler,
    prepare_collaborative,
)
from collab_core import CollaborativeConfigError
from tests.peers.accelerate_peer import make_data, make_model, make_optimizer, make_scheduler
from tests.support.accelerate_inprocess import (
    collaborative_peer,
    config,
    loader,
    max_diff,
    plain_accelerate,
    reset_accelerate_state,
    train,
)

BATCH = 8


def _collaborative_run(
    dht, run_id, *, accumulation, target, updates, samples=64, batch=BATCH, zero_grad=True, **settings
):
    accelerator = Accelerator(gradient_accumulation_steps=accumulation, **settings.pop("accelerator", {}))
    model, optimizer, scheduler = collaborative_peer(accelerator, dht, run_id, target, **settings)
    model, optimizer, data, scheduler = accelerator.prepare(model, optimizer, loader(samples, batch), scheduler)
    try:
        return train(accelerator, model, optimizer, scheduler, data, updates=updates, zero_grad=zero_grad)
    finally:
        optimizer.shutdown()


def _plain_run(*, target, updates, samples=64, batch=BATCH, **accelerator_kwargs):
    reset_accelerate_state()
    accelerator = Accelerator(gradient_accumulation_steps=target // batch, **accelerator_kwargs)
    return plain_accelerate(accelerator, loader(samples, batch), updates)


# ------------------------------------------------------------------------------------------ requirement 1


def test_accelerator_prepare_keeps_our_optimizer_and_scheduler(dht, run_id):
    accelerator = Accelerator()
    model, optimizer, scheduler = collaborative_peer(accelerator, dht, run_id, 32)
    try:
        assert optimizer._is_accelerate_prepared and scheduler._is_accelerate_prepared
        assert optimizer.optimizer is optimizer.collaborative_optimizer  # .optimizer exposed, not wrapped again
        prepared_model, prepared_optimizer = accelerator.prepare(model, optimizer)
        prepared_scheduler = accelerator.prepare(scheduler)  # a separate prepare(scheduler) works too
        assert prepared_optimizer is optimizer and isinstance(prepared_optimizer, CollaborativeAcceleratedOptimizer)
        assert prepared_scheduler is scheduler and isinstance(prepared_scheduler, CollaborativeAcceleratedScheduler)
        assert accelerator._optimizers == [optimizer] and accelerator._schedulers == [scheduler]
    finally:
        optimizer.shutdown()


def test_step_was_skipped_true_exactly_on_calls_without_update(dht, run_id):
    """Alone, target 32, batch 8, accumulation 2: the 4th, 8th, 12th call update; all others are skipped."""
    trained = _collaborative_run(dht, run_id, accumulation=2, target=32, updates=3)
    assert [i + 1 for i, skipped in enumerate(trained.skipped) if not skipped] == [4, 8, 12]
    assert trained.optimizer.collaborative_step == 3
    assert trained.optimizer.num_peers == 1


def test_step_with_non_finite_gradients_is_reported_as_skipped(dht, run_id):
    """A collaborative step whose (averaged) gradient holds NaN is taken without an update: step_was_skipped."""
    accelerator = Accelerator()
    model, optimizer, scheduler = collaborative_peer(accelerator, dht, run_id, 16)
    model, optimizer, data, scheduler = accelerator.prepare(model, optimizer, loader(32, BATCH), scheduler)
    loss_fn = torch.nn.CrossEntropyLoss()
    skipped, steps = [], []
    try:
        before = [p.detach().clone() for p in model.parameters()]
        for call, (_, x, y) in enumerate(data):
            with accelerator.accumulate(model):
                accelerator.backward(loss_fn(model(x), y))
                if call == 1:  # the call that completes the first collaborative step
                    next(model.parameters()).grad.fill_(float("nan"))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            skipped.append(optimizer.step_was_skipped)
            steps.append(optimizer.collaborative_step)
            if call == 1:
                assert max_diff(before, [p.detach() for p in model.parameters()]) == 0.0  # no update applied
    finally:
        optimizer.shutdown()
    assert steps == [0, 1, 1, 2]  # the NaN step still counts (every peer of the round skips it alike) ...
    assert skipped == [True, True, True, False]  # ... but it is not an update
    assert optimizer.collaborative_optimizer.collaboration_state.nonfinite_steps == 1


def test_prepare_collaborative_rejects_wrong_arguments(dht, run_id):
    accelerator = Accelerator()
    plain = make_optimizer(make_model(0).parameters())
    settings = config(run_id, 32)
    with pytest.raises(TypeError, match="already prepared by accelerator.prepare"):
        prepare_collaborative(accelerator, accelerator.prepare(plain), config=settings, dht=dht)
    other = make_optimizer(make_model(1).parameters())
    with pytest.raises(ValueError, match="scheduler is not built on this optimizer"):
        prepare_collaborative(accelerator, other, make_scheduler(plain), config=settings, dht=dht)
    with pytest.raises(TypeError, match="CollaborativeConfig.from_yaml"):
        prepare_collaborative(accelerator, other, config={"run_id": run_id}, dht=dht)
    deepspeed = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED)
    with pytest.raises(NotImplementedError, match="not DEEPSPEED"):
        prepare_collaborative(deepspeed, other, config=settings, dht=dht)


# ------------------------------------------------------------------------------------------ requirement 2


def test_batch_size_inferred_from_prepared_dataloader_with_accumulation(dht, run_id):
    """Nothing passes a batch size; with batch 4 and accumulation 2 the updates equal plain Accelerate with 32
    samples per step (8 micro-batches)."""
    trained = _collaborative_run(dht, run_id, accumulation=2, target=32, updates=4, batch=4)
    assert [i + 1 for i, skipped in enumerate(trained.skipped) if not skipped] == [8, 16, 24, 32]
    reference = _plain_run(target=32, updates=4, batch=4)
    for ours, theirs in zip(trained.params_after_update, reference.params_after_update, strict=True):
        assert max_diff(ours, theirs) <= 1e-6
    assert trained.lrs == pytest.approx(reference.lrs, rel=1e-12)


def test_batch_size_from_setting_or_step_argument_else_clear_error(dht, run_id):
    accelerator = Accelerator()
    model, optimizer, scheduler = collaborative_peer(accelerator, dht, run_id, 16)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    unprepared = loader(64, BATCH)  # not prepared: Accelerate cannot tell its batch size
    try:
        with pytest.raises(CollaborativeConfigError, match="batch_size") as error:
            train(accelerator, model, optimizer, scheduler, unprepared, updates=1)
        assert "COLLAB_BATCH_SIZE" in str(error.value) and error.value.setting == "batch_size"
        trained = train(accelerator, model, optimizer, scheduler, unprepared, updates=1, step_kwargs={"batch_size": 8})
        assert [i + 1 for i, s in enumerate(trained.skipped) if not s] == [2]  # 16 samples = 2 calls of 8
    finally:
        optimizer.shutdown()
    reset_accelerate_state()
    accelerator = Accelerator()
    model, optimizer, scheduler = collaborative_peer(accelerator, dht, run_id + "b", 16, batch_size=4)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    try:
        trained = train(accelerator, model, optimizer, scheduler, unprepared, updates=1)
        assert [i + 1 for i, s in enumerate(trained.skipped) if not s] == [4]  # batch_size setting: 4 per call
    finally:
        optimizer.shutdown()


def test_partial_accumulation_at_end_of_dataloader_is_weighted_by_its_samples(dht, run_id):
    """24 samples, batch 8, accumulation 2: the 3rd micro-batch is a real step alone (Accelerate forces a sync at the
    end of the dataloader, its loss still divided by 2); the update must use that batch's mean gradient."""
    trained = _collaborative_run(dht, run_id, accumulation=2, target=8, updates=2, samples=24)
    model = make_model(0)
    opt = make_optimizer(model.parameters())
    scheduler = make_scheduler(opt)
    x, y = make_data(0, 24)
    for chunk in (slice(0, 16), slice(16, 24)):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[chunk]), y[chunk]).backward()
        opt.step()
        scheduler.step()
    assert max_diff(trained.params, list(model.parameters())) <= 1e-6


# ------------------------------------------------------------------------------------------ requirement 4


@pytest.mark.parametrize(
    "reuse, zero_grad",
    [(False, True), (False, False), (True, True)],
    ids=["zero_grad-every-call", "never-zero_grad", "reuse_grad_buffers"],
)
def test_zero_grad_is_safe_in_every_mode(dht, run_id, reuse, zero_grad):
    """zero_grad on every call (Accelerate clears only on sync steps; with reuse_grad_buffers never), or never."""
    trained = _collaborative_run(
        dht, run_id, accumulation=2, target=32, updates=3, zero_grad=zero_grad, reuse_grad_buffers=reuse
    )
    reference = _plain_run(target=32, updates=3)
    for ours, theirs in zip(trained.params_after_update, reference.params_after_update, strict=True):
        assert max_diff(ours, theirs) <= 1e-6


def test_zero_grad_clears_on_sync_steps_and_keeps_accumulation_otherwise(dht, run_id):
    accelerator = Accelerator(gradient_accumulation_steps=2)
    model, optimizer, scheduler = collaborative_peer(accelerator, dht, run_id, 64)
    model, optimizer, data, scheduler = accelerator.prepare(model, optimizer, loader(64, BATCH), scheduler)
    try:
        _, x, y = next(iter(data))
        with accelerator.accumulate(model):  # 1st micro-batch: not a sync step
            accelerator.backward(torch.nn.functional.cross_entropy(model(x), y))
            optimizer.zero_grad()
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
        with accelerator.accumulate(model):  # 2nd: a sync step
            accelerator.backward(torch.nn.functional.cross_entropy(model(x), y))
            optimizer.step()
            assert optimizer.step_was_skipped  # 16 of 64 samples: no update yet
            optimizer.zero_grad()
            assert all(p.grad is None for p in model.parameters())
    finally:
        optimizer.shutdown()


# ------------------------------------------------------------------------------------------ requirement 5


def test_bf16_trains_on_cpu_like_plain_accelerate_bf16(dht, run_id):
    trained = _collaborative_run(
        dht, run_id, accumulation=2, target=32, updates=3, accelerator={"mixed_precision": "bf16"}
    )
    assert all(p.dtype == torch.float32 for p in trained.model.parameters())  # master weights stay fp32
    reference = _plain_run(target=32, updates=3, mixed_precision="bf16")
    fp32 = _plain_run(target=32, updates=3)
    bf16_vs_fp32 = max_diff(reference.params, fp32.params)
    ours_vs_bf16 = max_diff(trained.params, reference.params)
    print(f"bf16: |collaborative - plain bf16| = {ours_vs_bf16:.3e}, |plain bf16 - plain fp32| = {bf16_vs_fp32:.3e}")
    assert bf16_vs_fp32 > 1e-5  # autocast really ran in bf16
    assert ours_vs_bf16 <= 1e-6
