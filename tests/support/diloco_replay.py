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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from tests.peers.core_peer import make_model, make_optimizer, make_scheduler
from tests.support.round_contributions import round_contributions, sent_in_round


class _SimulatedPeer:
    def __init__(self, factories: Factories, outer_step: int):
        self.model = factories.model()
        self.opt = factories.inner(self.model.parameters())
        self.scheduler = factories.scheduler(self.opt) if factories.scheduler is not None else None
        if self.scheduler is not None:  # a joiner downloads the scheduler's state at this step
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "scheduler.step() before optimizer.step()"
                for _ in range(outer_step):
                    self.scheduler.step()

    def inner_step(self, chunk: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """One inner step on the micro-batches of one optimizer step (several with gradient accumulation: each
        loss divided by their number, as Lightning and Accelerate do)."""
        self.opt.zero_grad()
        dtype = next(self.model.parameters()).dtype
        for x, y in chunk:
            logits = self.model(x.to(dtype)).float()
            (torch.nn.functional.cross_entropy(logits, y) / len(chunk)).backward()
        self.opt.step()
        self.opt.zero_grad()


@dataclass(frozen=True)
class Factories:
    """How each simulated peer builds its model, inner optimizer and scheduler (as the peer script does)."""

    model: Callable[[], torch.nn.Module] = partial(make_model, 0)
    inner: Callable[[Any], torch.optim.Optimizer] = partial(make_optimizer, "adamw")
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None


def replay_diloco(
    results: dict[str, dict],
    steps: int,
    *,
    scheduler: bool = False,
    factories: Factories | None = None,
    batches_key: str = "inner_batches",
    accumulate: Mapping[str, int] | None = None,
    outer_lr: float = 0.7,
    outer_momentum: float = 0.9,
    nesterov: bool = True,
    sample_weighted: bool = True,
    only_peer: str | None = None,
) -> tuple[list[torch.Tensor], torch.optim.SGD]:
    """θ_global after ``steps`` outer steps, and the outer optimizer (its momentum), simulated in one process.

    Args:
        results: the peers' records, by name (``results[name][batches_key]`` lists ``(outer step, x, y)``).
        steps: outer steps to simulate.
        scheduler: the core peer's scheduler (``make_scheduler``) on every simulated peer.
        factories: model, inner optimizer and scheduler of the peer script (default: the core peer's, AdamW).
        batches_key: which record lists the micro-batches the inner optimizer trained on.
        accumulate: micro-batches per inner step, by peer name (gradient accumulation; default 1).
        outer_lr: the outer SGD's learning rate.
        outer_momentum: its momentum.
        nesterov: its Nesterov flag.
        sample_weighted: weight each peer's pseudo-gradient by its samples (False: equally).
        only_peer: use only this peer's pseudo-gradient (what a peer would get if nothing were averaged). In a
            round this peer was not in (under load a peer can miss one and download the state afterwards), the
            round's own pseudo-gradient: the peer would have downloaded the state it made.

    ``sample_weighted=False`` and ``nesterov=False`` exist to show that a test's comparison with this replay detects
    those mistakes.
    """
    if factories is None:
        factories = Factories(scheduler=make_scheduler if scheduler else None)
    global_params = [p.detach().float() for p in factories.model().parameters()]  # θ_global is float32
    outer = torch.optim.SGD(global_params, lr=outer_lr, momentum=outer_momentum, nesterov=nesterov)
    peers: dict[str, _SimulatedPeer] = {}
    for step in range(steps):
        contributions = round_contributions(results.values(), step)
        deltas: list[tuple[float, list[torch.Tensor]]] = []
        own: tuple[float, list[torch.Tensor]] | None = None  # only_peer's pseudo-gradient, if it was in the round
        for name, result in sorted(results.items()):
            items = [(x, y) for (k, x, y) in result[batches_key] if k == step]
            if not items:
                continue
            k = (accumulate or {}).get(name, 1)
            peer = peers.setdefault(name, _SimulatedPeer(factories, step))
            with torch.no_grad():
                for param, global_param in zip(peer.model.parameters(), global_params, strict=True):
                    param.copy_(global_param)
            samples = contributions.get(result["peer_id"], 0)
            took_step = step in result["contributions"]
            sent = sent_in_round(items, samples, lambda b: len(b[0]), took_step=took_step) if samples else []
            for start in range(0, len(sent), k):
                peer.inner_step(sent[start : start + k])
            if samples:
                delta = [g - p.detach().float() for g, p in zip(global_params, peer.model.parameters(), strict=True)]
                deltas.append((float(samples) if sample_weighted else 1.0, delta))
                if name == only_peer:
                    own = deltas[-1]
            rest = items[len(sent) :]
            for start in range(0, len(rest), k):
                peer.inner_step(rest[start : start + k])
        assert deltas, f"outer step {step} averaged nobody"
        if own is not None:
            deltas = [own]
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


__all__ = ["Factories", "replay_diloco"]
