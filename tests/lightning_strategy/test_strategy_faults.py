"""Failure orders (b) and (d) of the core's fork tests, with real Trainers: faults injected in each peer's own averager
process (``tests/peers/lightning_peer.py`` patches the core peer's hooks in before ``trainer.fit`` forks it).

(a) "a round completes on the others and fails on one peer after the exchange" with Trainers is the lockstep fixture
of ``test_strategy_runs.py``; the core's ``tests/core/test_fork_healing.py`` has every order on 2, 3 and 4 peers.
"""

from __future__ import annotations

import pytest

from tests.lightning_strategy.test_strategy_runs import max_diff, replay, run_lightning_peers
from tests.support.core_runs import state_diff

STEPS = 4
TIMEOUTS = dict(averaging_timeout=6, matchmaking_time=2)


@pytest.mark.slow
def test_trainers_whose_round_failed_as_it_started_or_froze_through_one_end_identical(tmp_path):
    """p1's round of step 1 fails as it starts (p0 gets partial results); p0 is stopped (SIGSTOP) for longer than the
    averaging timeout in its round of step 2. Both end at the same step with identical parameters and optimizer
    state, equal to one process replaying every round's contributed batches. (Two Trainers: the 3- and 4-peer
    orders are the core's, whose peers start in a fraction of a Trainer's time.)"""
    frozen_for = str(TIMEOUTS["averaging_timeout"] + 3)
    common = ["--peers", "2", "--steps", str(STEPS), "--scheduler", "step"]
    specs = [
        ("p0", [*common, "--batch-size", "16", "--data-seed", "1", "--freeze-at-step", "2",
                "--freeze-seconds", frozen_for], {}),
        ("p1", [*common, "--batch-size", "8", "--data-seed", "2", "--fail-round-start-at-step", "1"], {}),
    ]  # fmt: skip
    results = run_lightning_peers(tmp_path, "faults", specs, target_batch_size=64, **TIMEOUTS)
    assert "at its start" in results["p1"]["log"], "the round-start fault never fired"
    assert "freeze hook: SIGSTOP" in results["p0"]["log"], "the freeze never fired"
    names = sorted(results)
    assert {name: results[name]["collaborative_step"] for name in names} == dict.fromkeys(names, STEPS)
    reference = results["p0"]
    worst = max(
        max(max_diff(results[name]["final"], reference["final"]) for name in names),
        max(state_diff(results[name]["final_optimizer_state"], reference["final_optimizer_state"]) for name in names),
    )
    state = {name: results[name]["collaboration_state"] for name in names}
    print(
        f"\nforks healed { {n: s['forks_healed'] for n, s in state.items()} }, "
        f"downloads { {n: s['state_downloads'] for n, s in state.items()} }, max difference {worst:.2e}"
    )
    assert worst <= 1e-6, {name: results[name]["log"][-3000:] for name in names}
    assert len({s["fingerprint"] for s in state.values()}) == 1
    assert state["p0"]["failed_rounds"] >= 1  # the round of step 1 broke for the others too
    expected = list(replay(results, STEPS).parameters())
    for name in names:
        assert max_diff(results[name]["final"], expected) <= 1e-5
