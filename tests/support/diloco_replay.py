"""The single-process simulation of a DiLoCo run, from what its peers recorded (``tests/peers/core_peer.py``).

Every simulated peer keeps its own model and its own inner optimizer (and scheduler) for the whole run, as the real
peers do. For each outer step ``k``: every peer that trained at step ``k`` starts from θ_global(k) and takes one inner
step per micro-batch it recorded at ``k`` (``inner_batches``); the round's pseudo-gradient is the mean of
θ_global − θᵢ over the peers of the round, weighted by the samples each contributed (a prefix of its micro-batches,
:mod:`tests.support.round_contributions`); the outer SGD steps θ_global; every scheduler steps once. Micro-batches a
peer trained on after its round (before it noticed that it had to download) change only its inner optimizer's state.
"""

from __future__ import annotations

import warnings

import torch

from tests.peers.core_peer import make_model, make_optimizer, make_scheduler
from tests.support.round_contributions import round_contributions, sent_in_round


class _SimulatedPeer:
    def __init__(self, inner: str, scheduler: bool, outer_step: int):
        self.model = make_model(0)
        self.opt = make_optimizer(inner, self.model.parameters())
        self.scheduler = make_scheduler(self.opt) if scheduler else None
        if self.scheduler is not None:  # a joiner downloads the scheduler's state at this step
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "scheduler.step() before optimizer.step()"
                for _ in range(outer_step):
                    self.scheduler.step()

    def inner_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.opt.zero_grad()
        torch.nn.functional.cross_entropy(self.model(x), y).backward()
        self.opt.step()
        self.opt.zero_grad()


def replay_diloco(
    results: dict[str, dict],
    steps: int,
    *,
    inner: str = "adamw",
    scheduler: bool = False,
    outer_lr: float = 0.7,
    outer_momentum: float = 0.9,
    nesterov: bool = True,
    sample_weighted: bool = True,
) -> tuple[list[torch.Tensor], torch.optim.SGD]:
    """θ_global after ``steps`` outer steps, and the outer optimizer (its momentum), simulated in one process.

    ``sample_weighted=False`` (equal weights) and ``nesterov=False`` exist to show that the comparison of a test
    with this replay detects those mistakes.
    """
    global_params = [p.detach().clone() for p in make_model(0).parameters()]
    outer = torch.optim.SGD(global_params, lr=outer_lr, momentum=outer_momentum, nesterov=nesterov)
    peers: dict[str, _SimulatedPeer] = {}
    for step in range(steps):
        contributions = round_contributions(results.values(), step)
        deltas: list[tuple[float, list[torch.Tensor]]] = []
        for name, result in sorted(results.items()):
            items = [(x, y) for (k, x, y) in result["inner_batches"] if k == step]
            if not items:
                continue
            peer = peers.setdefault(name, _SimulatedPeer(inner, scheduler, step))
            with torch.no_grad():
                for param, global_param in zip(peer.model.parameters(), global_params, strict=True):
                    param.copy_(global_param)
            samples = contributions.get(result["peer_id"], 0)
            sent = (
                sent_in_round(items, samples, lambda b: len(b[0]), took_step=step in result["contributions"])
                if samples
                else []
            )
            for x, y in sent:
                peer.inner_step(x, y)
            if samples:
                delta = [g - p.detach() for g, p in zip(global_params, peer.model.parameters(), strict=True)]
                deltas.append((float(samples) if sample_weighted else 1.0, delta))
            for x, y in items[len(sent) :]:
                peer.inner_step(x, y)
        assert deltas, f"outer step {step} averaged nobody"
        total = sum(weight for weight, _ in deltas)
        for index, global_param in enumerate(global_params):
            global_param.grad = sum(weight * delta[index] for weight, delta in deltas) / total
        outer.step()
        for global_param in global_params:
            global_param.grad = None
        for peer in peers.values():
            if peer.scheduler is not None:
                peer.scheduler.step()
    return global_params, outer


__all__ = ["replay_diloco"]
