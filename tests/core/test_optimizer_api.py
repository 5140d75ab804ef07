"""The optimizer's API and its errors, with a real DHT and averager in this process (one peer at a time)."""

from __future__ import annotations

import itertools
import logging
import math

import hivemind
import pytest
import torch

from collab_core import CollaborativeAdaptiveOptimizer, CollaborativeOptimizer
from collab_core.optim import CollaborativeOptimizer as OptimAlias

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
_prefixes = itertools.count()


@pytest.fixture(scope="module")
def dht():
    node = hivemind.DHT(host_maddrs=LOOPBACK, start=True)
    yield node
    node.shutdown()


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 2)


def _collab(dht, opt=None, cls=CollaborativeOptimizer, **kwargs):
    opt = opt or torch.optim.SGD(_model().parameters(), lr=0.1, momentum=0.9)
    kwargs.setdefault("target_batch_size", 64)
    return cls(opt, dht=dht, prefix=f"api{next(_prefixes)}", **kwargs)


def _train_calls(collab, model, calls: int, batch_size: int = 32) -> None:
    for _ in range(calls):
        x = torch.randn(batch_size, 4)
        model(x).pow(2).mean().backward()
        collab.step(batch_size=batch_size)


@pytest.fixture
def solo(dht):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    collab = _collab(dht, opt, scheduler=scheduler)
    yield collab, model, scheduler
    collab.shutdown()


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("value", [0, -1, "64", 64.0, True, None])
def test_bad_target_batch_size(dht, value):
    with pytest.raises(ValueError, match="target_batch_size"):
        _collab(dht, target_batch_size=value)


def test_dht_not_running():
    stopped = hivemind.DHT(host_maddrs=LOOPBACK, start=False)
    with pytest.raises(ValueError, match="dht is not running.*start=True"):
        CollaborativeOptimizer(
            torch.optim.SGD(_model().parameters(), lr=0.1), dht=stopped, prefix="x", target_batch_size=8
        )


def test_optimizer_without_parameters(dht):
    with pytest.raises(ValueError, match="opt has no parameters"):
        _collab(dht, torch.optim.SGD([{"params": []}], lr=0.1))


def test_reuse_grad_buffers_with_accumulate_grads_on(dht):
    with pytest.raises(ValueError, match="reuse_grad_buffers.*accumulate_grads_on"):
        _collab(dht, reuse_grad_buffers=True, accumulate_grads_on=torch.device("cpu"))


def test_unknown_keyword_argument_is_named(dht):
    with pytest.raises(TypeError, match="bandwith"):
        _collab(dht, bandwith=100)


def test_bad_prefix(dht):
    with pytest.raises(ValueError, match="prefix"):
        CollaborativeOptimizer(
            torch.optim.SGD(_model().parameters(), lr=0.1), dht=dht, prefix="a.b", target_batch_size=8
        )


def test_unknown_average_opt_statistics_lists_available_names(dht):
    opt = torch.optim.Adam(_model().parameters(), lr=0.01)
    with pytest.raises(ValueError, match=r"'exp_avg_sqr'.*available names: \['exp_avg', 'exp_avg_sq', 'step'\]"):
        _collab(dht, opt, cls=CollaborativeAdaptiveOptimizer, average_opt_statistics=["exp_avg_sqr"])


def test_batch_size_required(solo):
    collab, _, _ = solo
    with pytest.raises(ValueError, match="batch_size is required.*batch_size_per_step"):
        collab.step()


@pytest.mark.parametrize("value", [0, -32, math.nan, math.inf, 2.5, "32", True])
def test_bad_batch_size(solo, value):
    collab, _, _ = solo
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        collab.step(batch_size=value)
    assert collab.collaboration_state.samples_accumulated == 0  # nothing was counted


# ------------------------------------------------------------------------------------------- API


def test_exported_from_collab_core_optim():
    assert OptimAlias is CollaborativeOptimizer


def test_solo_steps_scheduler_and_state(solo):
    collab, model, scheduler = solo
    assert collab.param_groups is collab.opt.param_groups
    _train_calls(collab, model, 3)
    state = collab.collaboration_state
    assert (collab.local_step, state.samples_accumulated, state.target_batch_size) == (1, 32, 64)
    assert state.num_peers == 1 and collab.is_synchronized
    assert collab.param_groups[0]["lr"] == pytest.approx(0.05)  # the scheduler stepped once per update
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())  # step() cleared .grad


def test_state_dict_round_trip_also_after_shutdown(solo, dht):
    collab, model, scheduler = solo
    _train_calls(collab, model, 4)
    collab.shutdown()
    checkpoint = collab.state_dict()  # e.g. Lightning saves checkpoints after teardown
    assert checkpoint["local_step"] == 2 and checkpoint["scheduler"]["last_epoch"] == 2
    with pytest.raises(ValueError, match="shut down"):
        collab.step(batch_size=32)

    model2 = _model()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    scheduler2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
    restored = _collab(dht, opt2, scheduler=scheduler2)
    try:
        restored.load_state_dict(checkpoint)
        assert restored.local_step == 2
        assert scheduler2.last_epoch == 2 and opt2.param_groups[0]["lr"] == pytest.approx(0.025)
        momentum = [opt2.state[p]["momentum_buffer"] for p in model2.parameters()]
        expected = [collab.opt.state[p]["momentum_buffer"] for p in model.parameters()]
        assert all(torch.equal(a, b) for a, b in zip(momentum, expected, strict=True))
        assert restored.collaboration_state.optimizer_step == 2
    finally:
        restored.shutdown()


def test_reuse_grad_buffers_keeps_gradients_on_zero_grad(dht, caplog):
    model = _model()
    collab = _collab(dht, torch.optim.SGD(model.parameters(), lr=0.1), reuse_grad_buffers=True)
    try:
        _train_calls(collab, model, 1)
        grads = [p.grad.clone() for p in model.parameters()]
        with caplog.at_level(logging.WARNING, logger="collab_core"):
            collab.zero_grad()
        assert "zero_grad() ignored" in caplog.text
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))

        model.zero_grad(set_to_none=True)  # bypassing the optimizer wipes the accumulated gradients
        model(torch.randn(32, 4)).pow(2).mean().backward()
        with pytest.raises(RuntimeError, match="reuse_grad_buffers=True.*Do not call zero_grad"):
            collab.step(batch_size=32)
    finally:
        collab.shutdown()


def test_adaptive_optimizer_creates_state_without_changing_anything(dht):
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=0.1)
    collab = _collab(dht, opt, cls=CollaborativeAdaptiveOptimizer, average_opt_statistics=["exp_avg_sq"])
    try:
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
        assert all(float(opt.state[p]["step"]) == 0 for p in model.parameters())
        # the first update equals a fresh Adam's first update on the same gradient
        reference = _model()
        reference_opt = torch.optim.Adam(reference.parameters(), lr=0.01, weight_decay=0.1)
        x = torch.randn(64, 4)
        for m in (model, reference):
            m(x).pow(2).mean().backward()
        collab.step(batch_size=64)
        reference_opt.step()
        assert all(
            torch.allclose(a, b, atol=1e-7) for a, b in zip(model.parameters(), reference.parameters(), strict=True)
        )
    finally:
        collab.shutdown()


def test_adaptive_round_failure_rolls_back_everything(dht):
    """A failed averaging round (injected: the all-reduce reports failure) must leave no trace: parameters, optimizer
    state, learning rate and the accumulated gradients (here in param.grad) are as before, so the retry is exact."""
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    collab = _collab(
        dht,
        opt,
        cls=CollaborativeAdaptiveOptimizer,
        average_opt_statistics=["exp_avg_sq"],
        scheduler=scheduler,
        reuse_grad_buffers=True,
        target_batch_size=1000,
    )
    try:
        _train_calls(collab, model, 2)
        params = [p.detach().clone() for p in model.parameters()]
        grads = [p.grad.clone() for p in model.parameters()]

        def optimizer_state():
            return {(i, k): v.clone() for i, p in enumerate(model.parameters()) for k, v in opt.state[p].items()}

        state = optimizer_state()
        # what the engine does around a round that did not complete: write this peer's part, then discard it
        scheme = collab.collaboration.scheme
        with collab.collaboration.averager.get_tensors() as buffers:
            scheme.write(buffers, collab.local_step)
        assert any(not torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))  # stepped locally
        scheme.discard()
        assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
        assert all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters(), strict=True))
        after = optimizer_state()
        assert after.keys() == state.keys() and all(torch.equal(state[k], after[k]) for k in state)
        assert opt.param_groups[0]["lr"] == 0.01 and collab.local_step == 0
    finally:
        collab.shutdown()


def test_creating_an_optimizer_keeps_ctrl_c_working(dht):
    # hivemind's averager start-up sets SIGINT to SIG_IGN in the calling process and never restores it
    import signal

    before = signal.getsignal(signal.SIGINT)
    collab = _collab(dht)
    try:
        assert signal.getsignal(signal.SIGINT) is before
    finally:
        collab.shutdown()
