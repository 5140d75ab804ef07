"""Reading the results of Lightning peers: the single-process replay of what the collaboration averaged.

The peer scripts (``tests/peers/lightning_peer.py``, ``tests/peers/lightning_multidevice_peer.py``) record every
micro-batch labelled with the collaborative step it was computed at; ``round_contributions`` picks those each step
averaged. A peer with several local processes is one peer: :func:`as_one_peer` merges its processes' records.
"""

from __future__ import annotations

import torch

from tests.peers.lightning_peer import lr_factor, make_net
from tests.support.round_contributions import contributed_batches

BASE_LR = 0.1


def max_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def replay(results: dict, steps: int) -> torch.nn.Module:
    """One process trains on every contributed batch of each collaborative step as one large batch."""
    net = make_net()
    opt = torch.optim.SGD(net.parameters(), lr=BASE_LR, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    for step in range(steps):
        batches = [batch for sent in contributed_batches(results, step, "batches").values() for batch in sent]
        opt.zero_grad()
        total = sum(len(x) for x, _ in batches)
        (sum(torch.nn.functional.cross_entropy(net(x), y, reduction="sum") for x, y in batches) / total).backward()
        opt.step()
        scheduler.step()
    return net


def as_one_peer(ranks: list[dict]) -> dict:
    """The records of one peer's local processes (rank 0 first) as one peer's: its i-th micro-batch is the i-th
    micro-batches of all processes together (they step together: one report of their summed samples per call)."""
    leader = ranks[0]
    batches = []
    for calls in zip(*(rank["batches"] for rank in ranks), strict=True):
        steps = {step for step, _x, _y in calls}
        assert len(steps) == 1, f"the local processes computed one call at different collaborative steps: {steps}"
        batches.append((steps.pop(), torch.cat([x for _s, x, _y in calls]), torch.cat([y for _s, _x, y in calls])))
    return {**leader, "batches": batches}
