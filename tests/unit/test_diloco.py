"""DiLoCo in one process: the outer step's arithmetic, its state, checkpoints, join() from settings, bad input.

One peer alone takes every outer step by itself (``step_alone``), which runs the same scheme code as a round, so the
numbers can be compared with a plain loop here. The multi-peer promises are in ``tests/core/test_diloco.py``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import hivemind
import pytest
import torch

from collab_core import CollaborativeSettings, DiLoCoOptimizer
from collab_core.collaboration import StepOutcome
from collab_core.diloco import DiLoCoAveraging
from collab_core.join import join

pytestmark = pytest.mark.timeout(60)

BATCH = 8
INNER_STEPS = 4


@pytest.fixture(scope="module")
def dht() -> Iterator[hivemind.DHT]:
    node = hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    yield node
    node.shutdown()


def _model(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).to(dtype)


def _diloco(model: torch.nn.Module, dht: hivemind.DHT, prefix: str, **kwargs) -> DiLoCoOptimizer:
    inner = torch.optim.AdamW(model.parameters(), lr=0.01)
    kwargs.setdefault("target_batch_size", BATCH * INNER_STEPS)
    return DiLoCoOptimizer(inner, dht=dht, prefix=prefix, batch_size_per_step=BATCH, matchmaking_time=1.0, **kwargs)


def _batches(count: int, seed: int = 1, dtype: torch.dtype = torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(BATCH, 4, generator=generator), torch.randn(BATCH, 2, generator=generator)) for _ in range(count)
    ]


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    dtype = next(model.parameters()).dtype
    return torch.nn.functional.mse_loss(model(x.to(dtype)).float(), y)


def _plain_diloco(batches, outer_lr=0.7, momentum=0.9, nesterov=True, scheduler=False):
    """The same training as a plain loop: AdamW inner steps; every INNER_STEPS an outer SGD step on θ − θ_local."""
    model = _model()
    inner = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(inner, lambda step: 1.0 / (1 + step)) if scheduler else None
    global_params = [p.detach().clone() for p in model.parameters()]
    outer = torch.optim.SGD(global_params, lr=outer_lr, momentum=momentum, nesterov=nesterov)
    for call, (x, y) in enumerate(batches, start=1):
        _loss(model, x, y).backward()
        inner.step()
        inner.zero_grad()
        if call % INNER_STEPS == 0:
            for g, p in zip(global_params, model.parameters(), strict=True):
                g.grad = g.detach() - p.detach()
            outer.step()
            with torch.no_grad():
                for g, p in zip(global_params, model.parameters(), strict=True):
                    p.copy_(g)
            if sched is not None:
                sched.step()
    return model, outer


def _train(opt: DiLoCoOptimizer, model: torch.nn.Module, batches) -> list[StepOutcome]:
    outcomes = []
    for x, y in batches:
        _loss(model, x, y).backward()
        opt.step()
        assert opt.last_step_report is not None
        outcomes.append(opt.last_step_report.outcome)
    return outcomes


def max_diff(a, b) -> float:
    return max((x.detach().float() - y.detach().float()).abs().max().item() for x, y in zip(a, b, strict=True))


def test_alone_each_step_is_an_inner_step_and_every_target_an_outer_nesterov_step(dht):
    batches = _batches(3 * INNER_STEPS)
    model = _model()
    opt = _diloco(model, dht, "solo_math")
    try:
        outcomes = _train(opt, model, batches)
        assert outcomes == ([StepOutcome.ACCUMULATED] * (INNER_STEPS - 1) + [StepOutcome.UPDATED]) * 3
        assert opt.local_step == 3
        assert all(report is not None for report in [opt.last_step_report])
        expected, outer = _plain_diloco(batches)
        diff = max_diff(model.parameters(), expected.parameters())
        assert diff <= 1e-6, diff
        assert max_diff(opt.global_parameters, expected.parameters()) <= 1e-6
        momentum = [opt.outer_optimizer.state[p]["momentum_buffer"] for p in opt.global_parameters]
        assert max_diff(momentum, [outer.state[p]["momentum_buffer"] for p in outer.param_groups[0]["params"]]) <= 1e-6
        # the inner optimizer's state persisted across the outer steps: 12 inner steps
        assert all(int(opt.opt.state[p]["step"]) == 3 * INNER_STEPS for p in model.parameters())
    finally:
        opt.shutdown()


def test_the_check_above_fails_without_nesterov_or_with_another_outer_lr():
    """The comparison can tell the outer optimizer's settings apart (so a missing Nesterov term is caught)."""
    batches = _batches(2 * INNER_STEPS)
    reference, _ = _plain_diloco(batches)
    for variant in ({"nesterov": False}, {"outer_lr": 1.0}):
        other, _ = _plain_diloco(batches, **variant)
        assert max_diff(reference.parameters(), other.parameters()) > 1e-3, variant


def test_every_step_reports_a_local_parameter_change(dht):
    model = _model()
    opt = _diloco(model, dht, "solo_changes")
    try:
        x, y = _batches(1)[0]
        before = [p.detach().clone() for p in model.parameters()]
        _loss(model, x, y).backward()
        opt.step()
        report = opt.last_step_report
        assert report is not None and report.outcome is StepOutcome.ACCUMULATED
        assert report.local_update and report.parameters_changed and not report.stepped
        assert max_diff(before, model.parameters()) > 0
        assert all(p.grad is None for p in model.parameters())  # consumed by the inner step
    finally:
        opt.shutdown()


def test_scheduler_steps_once_per_outer_step(dht):
    batches = _batches(3 * INNER_STEPS)
    model = _model()
    inner = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(inner, lambda step: 1.0 / (1 + step))
    opt = DiLoCoOptimizer(
        inner, dht=dht, prefix="solo_sched", target_batch_size=BATCH * INNER_STEPS, batch_size_per_step=BATCH,
        scheduler=sched, matchmaking_time=1.0,
    )  # fmt: skip
    try:
        _train(opt, model, batches)
        assert sched.last_epoch == 3
        assert inner.param_groups[0]["lr"] == pytest.approx(0.01 / 4)
        expected, _ = _plain_diloco(batches, scheduler=True)
        assert max_diff(model.parameters(), expected.parameters()) <= 1e-6
    finally:
        opt.shutdown()


def test_a_joiner_gets_global_params_outer_momentum_step_scheduler_and_lr_with_a_fresh_inner_optimizer(dht):
    """What a download carries, by the scheme's capture/restore (the multi-peer test checks it over the network)."""
    batches = _batches(2 * INNER_STEPS + 1)
    model = _model()
    inner = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(inner, lambda step: 1.0 / (1 + step))
    opt = DiLoCoOptimizer(
        inner, dht=dht, prefix="capture", target_batch_size=BATCH * INNER_STEPS, batch_size_per_step=BATCH,
        scheduler=sched, matchmaking_time=1.0,
    )  # fmt: skip
    joiner_model = _model(seed=5)
    joiner_inner = torch.optim.AdamW(joiner_model.parameters(), lr=0.01)
    joiner_sched = torch.optim.lr_scheduler.LambdaLR(joiner_inner, lambda step: 1.0 / (1 + step))
    joiner = DiLoCoOptimizer(
        joiner_inner, dht=dht, prefix="capture_joiner", target_batch_size=BATCH * INNER_STEPS,
        batch_size_per_step=BATCH, scheduler=joiner_sched, matchmaking_time=1.0,
    )  # fmt: skip
    try:
        _train(opt, model, batches)  # 2 outer steps and one inner step past them
        metadata, tensors = opt.collaboration.scheme.capture(opt.local_step)
        step = joiner.collaboration.scheme.restore(metadata, tensors)
        assert step == 2
        assert max_diff(joiner.global_parameters, opt.global_parameters) == 0
        assert max_diff(joiner_model.parameters(), opt.global_parameters) == 0  # θ_local = θ_global
        outer, joined = opt.outer_optimizer, joiner.outer_optimizer
        for mine, theirs in zip(outer.param_groups[0]["params"], joined.param_groups[0]["params"], strict=True):
            assert torch.equal(outer.state[mine]["momentum_buffer"], joined.state[theirs]["momentum_buffer"])
        assert joiner_sched.last_epoch == sched.last_epoch == 2
        assert joiner_inner.param_groups[0]["lr"] == inner.param_groups[0]["lr"] == pytest.approx(0.01 / 3)
        assert not joiner_inner.state  # fresh inner optimizer
    finally:
        opt.shutdown()
        joiner.shutdown()


def test_checkpoint_round_trip_keeps_global_params_and_outer_momentum(dht):
    batches = _batches(2 * INNER_STEPS)  # a checkpoint right after an outer step (see the README's DiLoCo section)
    model = _model()
    opt = _diloco(model, dht, "ckpt")
    restored_model = _model(seed=3)
    restored = _diloco(restored_model, dht, "ckpt2")
    try:
        _train(opt, model, batches)
        state = copy.deepcopy(opt.state_dict())  # as saved to disk (a state dict references the live tensors)
        assert state["local_step"] == 2 and state["scheme"]["algorithm"] == "diloco"
        restored_model.load_state_dict(model.state_dict())  # the trainer restores θ_local from its checkpoint
        restored.load_state_dict(state)
        assert restored.local_step == 2
        assert restored.collaboration.fingerprint == opt.collaboration.fingerprint
        assert max_diff(restored.global_parameters, opt.global_parameters) == 0
        # both continue identically (inner state, θ_local, θ_global and momentum were all restored)
        more = _batches(INNER_STEPS, seed=9)
        _train(opt, model, more)
        _train(restored, restored_model, more)
        assert opt.local_step == restored.local_step == 3
        assert max_diff(model.parameters(), restored_model.parameters()) == 0
    finally:
        opt.shutdown()
        restored.shutdown()


def test_bf16_inner_training_keeps_the_global_state_and_pseudo_gradient_float32(dht):
    batches = _batches(2 * INNER_STEPS)
    model = _model(dtype=torch.bfloat16)
    opt = _diloco(model, dht, "bf16")
    try:
        _train(opt, model, batches)
        assert opt.local_step == 2
        scheme = opt.collaboration.scheme
        assert isinstance(scheme, DiLoCoAveraging)
        assert all(p.dtype == torch.float32 for p in opt.global_parameters)
        assert all(b.dtype == torch.float32 for b in scheme.make_buffers())
        assert all(s["momentum_buffer"].dtype == torch.float32 for s in opt.outer_optimizer.state.values())
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
        assert all(torch.isfinite(p).all() for p in model.parameters())
        # θ_local is θ_global rounded to bf16 after each outer step
        assert max_diff(model.parameters(), opt.global_parameters) <= 1e-2
    finally:
        opt.shutdown()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"outer_lr": 0}, "outer_lr must be > 0"),
        ({"outer_lr": -0.5}, "outer_lr must be > 0"),
        ({"outer_lr": float("nan")}, "outer_lr must be a finite number"),
        ({"outer_momentum": 1.0}, r"outer_momentum must be a number in \[0, 1\)"),
        ({"outer_momentum": 0.0}, "nesterov=True needs outer_momentum > 0"),
        ({"nesterov": "yes"}, "nesterov must be True or False"),
        ({"reuse_grad_buffers": True}, "reuse_grad_buffers=True does not apply to DiLoCo"),
        ({"accumulate_grads_on": torch.device("cpu")}, "accumulate_grads_on does not apply to DiLoCo"),
        ({"grad_scaler": torch.amp.GradScaler("cpu")}, "bf16"),
        ({"target_batch_size": 0}, "target_batch_size"),
    ],
)
def test_bad_arguments_are_errors_naming_the_argument_and_the_fix(dht, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _diloco(_model(), dht, "bad", **kwargs)


def test_join_with_algorithm_diloco_from_the_environment_alone(monkeypatch):
    monkeypatch.setenv("COLLAB_ALGORITHM", "diloco")
    monkeypatch.setenv("COLLAB_OUTER_LR", "0.5")
    monkeypatch.setenv("COLLAB_OUTER_MOMENTUM", "0.8")
    settings = CollaborativeSettings.resolve(
        run_id="join_diloco", target_batch_size=64, host_maddrs=["/ip4/127.0.0.1/tcp/0"]
    )
    membership = join(torch.optim.AdamW(_model().parameters(), lr=1e-3), settings, print_hint=False)
    try:
        opt = membership.optimizer
        assert isinstance(opt, DiLoCoOptimizer)
        group = opt.outer_optimizer.param_groups[0]
        assert (group["lr"], group["momentum"], group["nesterov"]) == (0.5, 0.8, True)
    finally:
        membership.close()


def test_a_gradient_mode_state_is_refused_with_a_clear_message(dht):
    from collab_core import CollaborativeOptimizer

    gradient_model = _model()
    gradient = CollaborativeOptimizer(
        torch.optim.SGD(gradient_model.parameters(), lr=0.1), dht=dht, prefix="mixed_g", target_batch_size=8
    )
    opt = _diloco(_model(), dht, "mixed_d")
    try:
        assert opt.collaboration.fingerprint != gradient.collaboration.fingerprint  # never one round together
        metadata, tensors = gradient.collaboration.scheme.capture(0)
        with pytest.raises(ValueError, match="same algorithm"):
            opt.collaboration.scheme.restore(metadata, tensors)
        metadata, tensors = opt.collaboration.scheme.capture(0)
        with pytest.raises(ValueError, match="same algorithm"):
            gradient.collaboration.scheme.restore(metadata, tensors)
    finally:
        opt.shutdown()
        gradient.shutdown()
