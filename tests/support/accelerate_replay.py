"""Reading the results of Accelerate peers: contributions per collaborative step and the single-process replay."""

from __future__ import annotations

import torch

from tests.peers.accelerate_peer import make_data, make_model, make_optimizer, make_scheduler
from tests.support.round_contributions import round_contributions, sent_in_round


def max_diff(tensors_a, tensors_b) -> float:
    return max((a - b).abs().max().item() for a, b in zip(tensors_a, tensors_b, strict=True))


def contributions(peers: dict[str, list[dict]], step: int) -> dict[str, torch.Tensor]:
    """Sample indices each peer contributed to collaborative ``step`` (all its local processes together).

    A peer's local processes compute one micro-batch each per call, so the round sent a prefix of those calls.
    """
    averaged = round_contributions((ranks[0] for ranks in peers.values()), step)
    found = {}
    for name, ranks in peers.items():
        if ranks[0]["peer_id"] not in averaged:
            continue
        per_rank = ([index for (k, index) in rank["micro_batches"] if k == step] for rank in ranks)
        calls = list(zip(*per_rank, strict=True))
        samples, took_step = averaged[ranks[0]["peer_id"]], step in ranks[0]["contributions"]
        sent = sent_in_round(calls, samples, lambda call: sum(map(len, call)), took_step=took_step)
        found[name] = torch.cat([index for call in sent for index in call])
    return found


def replay_single_process(peers: dict[str, list[dict]], data_seeds: dict[str, int], samples: int, steps: int):
    """One process trains on every contributed sample of each collaborative step as one large batch.

    Returns the model, the learning rate of each update, and the number of samples of each step.
    """
    model = make_model(0)
    opt = make_optimizer(model.parameters())
    scheduler = make_scheduler(opt)
    data = {name: make_data(seed, samples) for name, seed in data_seeds.items()}
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
    lrs, sizes = [], []
    for step in range(steps):
        batches = [(data[name][0][idx], data[name][1][idx]) for name, idx in contributions(peers, step).items()]
        total = sum(len(x) for x, _ in batches)
        opt.zero_grad()
        loss = sum(loss_fn(model(x), y) for x, y in batches) / total
        loss.backward()
        lrs.append(opt.param_groups[0]["lr"])
        sizes.append(total)
        opt.step()
        scheduler.step()
    return model, lrs, sizes, opt.param_groups[0]["lr"]


def plain_loop_learning_rates(steps: int) -> list[float]:
    """The learning rate of each update of a plain ``opt.step(); scheduler.step()`` loop (plus the one after)."""
    opt = make_optimizer([torch.nn.Parameter(torch.zeros(1))])
    scheduler = make_scheduler(opt)
    rates = []
    for _ in range(steps):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return [*rates, opt.param_groups[0]["lr"]]
