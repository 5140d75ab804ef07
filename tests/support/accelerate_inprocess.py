"""A collaborative peer inside the test process (real DHT and averager), and the plain Accelerate loop to match.

A peer alone with ``target_batch_size = T`` updates after every ``T`` samples, so it must make exactly the updates of
a plain Accelerate loop that accumulates ``T`` samples per optimizer step (``gradient_accumulation_steps = T / batch``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from accelerate_collab import CollaborativeConfig, prepare_collaborative
from tests.peers.accelerate_peer import make_data, make_model, make_optimizer, make_scheduler
from tests.support.processes import LOOPBACK


def reset_accelerate_state() -> None:
    """Forget Accelerate's process-wide singletons (as Accelerate's own test case class does)."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def config(run_id: str, target: int, **settings: Any) -> CollaborativeConfig:
    """Settings of an in-process peer, independent of the environment the tests run in."""
    settings.setdefault("host_maddrs", [LOOPBACK])
    return CollaborativeConfig.resolve(env={}, run_id=run_id, target_batch_size=target, **settings)


def loader(samples: int, batch_size: int, seed: int = 0) -> torch.utils.data.DataLoader:
    x, y = make_data(seed, samples)
    dataset = torch.utils.data.TensorDataset(torch.arange(samples), x, y)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)


@dataclass
class Trained:
    """What a training loop did: per call, whether the step was skipped; parameters and LR after every update."""

    model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    skipped: list[bool] = field(default_factory=list)
    params_after_update: list[list[torch.Tensor]] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)

    @property
    def params(self) -> list[torch.Tensor]:
        return [p.detach().clone().float() for p in self.model.parameters()]


def train(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    data: Any,
    *,
    updates: int,
    zero_grad: bool = True,
    step_kwargs: dict | None = None,
    max_calls: int = 1000,
) -> Trained:
    """The ordinary Accelerate loop; stops after ``updates`` optimizer updates (non-skipped steps)."""
    trained = Trained(model, optimizer, scheduler)
    loss_fn = torch.nn.CrossEntropyLoss()
    calls = 0
    while len(trained.params_after_update) < updates and calls < max_calls:
        for _, x, y in data:
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    logits = model(x)
                accelerator.backward(loss_fn(logits.float(), y))
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step(**(step_kwargs or {}))
                scheduler.step()
                if zero_grad:
                    optimizer.zero_grad()
            calls += 1
            skipped = not accelerator.sync_gradients or accelerator.optimizer_step_was_skipped
            trained.skipped.append(skipped)
            if not skipped:
                trained.params_after_update.append(trained.params)
                trained.lrs.append(lr)
            if len(trained.params_after_update) >= updates or calls >= max_calls:
                break
    return trained


def collaborative_peer(
    accelerator: Accelerator,
    dht: Any,
    run_id: str,
    target: int,
    *,
    progress_bar: bool = False,
    log_metrics: bool = True,
    **settings: Any,
) -> tuple[torch.nn.Module, Any, Any]:
    """Model, collaborative optimizer and scheduler (not yet passed to ``accelerator.prepare``)."""
    model = make_model(0)
    optimizer = make_optimizer(model.parameters())
    scheduler = make_scheduler(optimizer)
    optimizer, scheduler = prepare_collaborative(
        accelerator,
        optimizer,
        scheduler,
        config=config(run_id, target, **settings),
        dht=dht,
        progress_bar=progress_bar,
        log_metrics=log_metrics,
    )
    return model, optimizer, scheduler


def plain_accelerate(accelerator: Accelerator, data: Any, updates: int) -> Trained:
    """The reference: Accelerate's own optimizer and scheduler wrappers, no collaboration."""
    model = make_model(0)
    optimizer = make_optimizer(model.parameters())
    scheduler = make_scheduler(optimizer)
    model, optimizer, data, scheduler = accelerator.prepare(model, optimizer, data, scheduler)
    return train(accelerator, model, optimizer, scheduler, data, updates=updates)


def max_diff(tensors_a, tensors_b) -> float:
    return max((a - b).abs().max().item() for a, b in zip(tensors_a, tensors_b, strict=True))
