"""Fingerprints, round verdicts, download acceptance and timeouts: the pure parts of the engine, on fabricated data."""

from __future__ import annotations

import torch

from collab_core.fingerprint import (
    FINGERPRINT_KEY_BITS,
    fingerprint_key_bits,
    is_fingerprint,
    next_fingerprint,
    tensors_fingerprint,
)
from collab_core.rounds import AveragingRound, RoundStatus
from collab_core.sync import ServedState, refusal
from collab_core.timeouts import RoundTimeouts

FP = "0123456789abcdef"


def test_members_of_one_round_reach_the_same_fingerprint_whatever_the_order():
    one = next_fingerprint(FP, 4, {b"a": 32, b"b": 16})
    assert one == next_fingerprint(FP, 4, {b"b": 16, b"a": 32})
    assert is_fingerprint(one)


def test_fingerprint_changes_with_history_step_and_contributions():
    base = next_fingerprint(FP, 4, {b"a": 32, b"b": 16})
    assert base != next_fingerprint("f" * 16, 4, {b"a": 32, b"b": 16})
    assert base != next_fingerprint(FP, 5, {b"a": 32, b"b": 16})
    assert base != next_fingerprint(FP, 4, {b"a": 32})  # a peer that took the step alone
    assert base != next_fingerprint(FP, 4, {b"a": 32, b"b": 17})


def test_tensor_fingerprint_is_exact():
    weights = [torch.arange(6, dtype=torch.float32).reshape(2, 3), torch.tensor(1.5)]
    same = [w.clone() for w in weights]
    assert tensors_fingerprint(weights) == tensors_fingerprint(same)
    nudged = [weights[0].clone(), torch.nextafter(torch.tensor(1.5), torch.tensor(2.0))]
    assert tensors_fingerprint(weights) != tensors_fingerprint(nudged)
    assert tensors_fingerprint(weights, step=0) != tensors_fingerprint(weights, step=1)


def test_fingerprint_key_bits():
    bits = fingerprint_key_bits("f00f" + "0" * 12)
    assert bits == "1111000000001111" and len(bits) == FINGERPRINT_KEY_BITS
    assert fingerprint_key_bits("not a fingerprint") == "0" * FINGERPRINT_KEY_BITS


def _round(cap=None) -> AveragingRound:
    return AveragingRound(averager=None, timeouts=RoundTimeouts(3, 10, 1), target_batch_size=100, group_size_cap=cap)


def test_round_verdicts_from_gathered_data():
    ok = {b"a": dict(step=3, samples=60, fingerprint=FP), b"b": dict(step=3, samples=40, fingerprint=FP)}
    assert _round().classify(ok, 3, FP) is RoundStatus.COMPLETED
    mixed_steps = {**ok, b"b": dict(step=4, samples=40, fingerprint=FP)}
    assert _round().classify(mixed_steps, 3, FP) is RoundStatus.MIXED_STEPS
    mixed_states = {**ok, b"b": dict(step=3, samples=40, fingerprint="f" * 16)}
    assert _round().classify(mixed_states, 3, FP) is RoundStatus.MIXED_STATES
    short = {**ok, b"b": dict(step=3, samples=39, fingerprint=FP)}
    assert _round().classify(short, 3, FP) is RoundStatus.SHORT
    assert _round(cap=2).classify(short, 3, FP) is RoundStatus.COMPLETED  # capped groups hold part of the target
    assert _round().classify({**ok, b"c": "garbage"}, 3, FP) is RoundStatus.MIXED_STEPS


def test_which_served_states_load():
    def served(step, fp=FP):
        return ServedState({"step": step, "fingerprint": fp}, [])

    assert refusal(served(5), 5, FP, require_newer=False, wanted=None) is None  # manual load_state_from_peers
    assert "older" in refusal(served(4), 5, FP, require_newer=False, wanted=None)
    assert refusal(served(6), 5, FP, require_newer=True, wanted=None) is None
    assert "own step" in refusal(served(5), 5, FP, require_newer=True, wanted=None)
    # healing a fork at the same step: only the winner's state loads
    assert refusal(served(5, "b" * 16), 5, FP, require_newer=True, wanted="b" * 16) is None
    assert "not the fork's winner" in refusal(served(5, "c" * 16), 5, FP, require_newer=True, wanted="b" * 16)
    assert refusal(served(6, "c" * 16), 5, FP, require_newer=True, wanted="b" * 16) is None  # winner moved on
    assert refusal(ServedState({"step": "x"}, []), 5, FP, require_newer=False, wanted=None) is not None


def test_timeouts_derived_once():
    timeouts = RoundTimeouts(matchmaking=3, averaging=10, request=1)
    assert timeouts.matchmaking_window == 5
    assert timeouts.round == 15 == timeouts.state_chunk
    assert timeouts.download == 25
    assert RoundTimeouts(3, 10, 1, chunk=7).download == 17
