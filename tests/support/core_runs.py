"""Running core peers (``tests/peers/core_peer.py``) and checking their results: the core semantics tests' helpers."""

from __future__ import annotations

import torch

from tests.peers.core_peer import make_model, make_optimizer, make_scheduler
from tests.support.processes import PeerSet, bootstrap_dht, collab_env
from tests.support.round_contributions import contributed_batches

TIMEOUT = 240


def max_diff(tensors_a, tensors_b) -> float:
    """Largest absolute difference between two sequences of tensors."""
    return max((a - b).abs().max().item() for a, b in zip(tensors_a, tensors_b, strict=True))


def state_diff(state_a: dict, state_b: dict) -> float:
    """Largest absolute difference between two dicts of tensors with the same keys (0 when empty)."""
    assert state_a.keys() == state_b.keys()
    return max([0.0] + [(state_a[k] - state_b[k]).abs().max().item() for k in state_a])


def run_peers(tmp_path, run_id, peer_specs, timeout=TIMEOUT, **settings):
    """Run peers ``(name, args, env)`` to completion against a fresh bootstrap DHT; return their results."""
    with bootstrap_dht() as dht, PeerSet(tmp_path, collab_env(dht, run_id, **settings)) as peers:
        started = [peers.start(name, args, env) for name, args, env in peer_specs]
        peers.wait(started, timeout=timeout)
        return {peer.name: {**peer.result(), "log": peer.log_text()} for peer in started}


def replay_single_process(results: dict, optimizer: str, steps: int, scheduler: bool):
    """Train one model on every contributed micro-batch of each collaborative step as one large batch."""
    model = make_model(0)
    opt = make_optimizer(optimizer, model.parameters())
    sched = make_scheduler(opt) if scheduler else None
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
    for step in range(steps):
        batches = [batch for sent in contributed_batches(results, step, "micro_batches").values() for batch in sent]
        total = sum(len(x) for x, _ in batches)
        opt.zero_grad()
        loss = sum(loss_fn(model(x), y) for x, y in batches) / total
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
    return model, opt


def peer_spec(name, batch_size, data_seed, steps, *extra, env=None, peers=3):
    """``(name, args, env)`` of one core peer, for :func:`run_peers`."""
    args = [
        "--peers",
        str(peers),
        "--steps",
        str(steps),
        "--batch-size",
        str(batch_size),
        "--data-seed",
        str(data_seed),
    ]
    return name, [*args, *extra], env or {}
