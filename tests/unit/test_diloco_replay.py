"""The DiLoCo replay's unaveraged baseline (``only_peer``) on fabricated records, including a round the chosen peer
missed (under load a peer can fall out of a round and download the state the others made)."""

from __future__ import annotations

import torch

from tests.support.diloco_replay import Factories, replay_diloco
from tests.support.reliability import tensor_diff


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(8, 8, generator=generator), torch.randint(0, 4, (8,), generator=generator)


def _record(peer_id: str, batches: dict[int, int], contributions: dict[int, dict[str, int]]) -> dict:
    """One peer's record: its micro-batch (by seed) of each step it trained at, the rounds it took itself."""
    return {
        "peer_id": peer_id,
        "inner_batches": [(step, *_batch(seed)) for step, seed in batches.items()],
        "contributions": contributions,
    }


# a stateless inner optimizer: a peer's pseudo-gradient depends only on θ_global and its batch
STATELESS = Factories(inner=lambda params: torch.optim.SGD(params, lr=0.1))


def test_the_baseline_follows_the_round_where_its_peer_was_missing():
    both = {"id0": 8, "id1": 8}
    missed = {  # p0 is in round 0, misses round 1 (p1 steps alone), and downloads
        "p0": _record("id0", {0: 0}, {0: both}),
        "p1": _record("id1", {0: 1, 1: 2}, {0: both, 1: {"id1": 8}}),
    }
    expected = {  # the same outer steps with p0's pseudo-gradient alone in round 0
        "p0": _record("id0", {0: 0}, {0: {"id0": 8}}),
        "p1": _record("id1", {1: 2}, {1: {"id1": 8}}),
    }
    baseline, _ = replay_diloco(missed, 2, factories=STATELESS, only_peer="p0")
    wanted, _ = replay_diloco(expected, 2, factories=STATELESS)
    assert tensor_diff(baseline, wanted) == 0
    averaged, _ = replay_diloco(missed, 2, factories=STATELESS)
    assert tensor_diff(averaged, baseline) > 1e-4  # round 0 averaged two different pseudo-gradients
