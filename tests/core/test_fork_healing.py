"""Failure orders that used to fork the replicas, each forced deterministically by a fault injected in a real peer
(its own averager process or its engine), never by timing luck. Every run ends with every peer at the same step and
identical (parameters and optimizer state), and says how many forks were healed.

(a) "a round completes on the others and fails on one peer after the exchange" on 2 peers is
``test_collaborative_semantics.py::test_peer_whose_round_failed_on_its_side_downloads_and_the_update_stays_exact``,
and on 3 Lightning peers the lockstep fixture of ``tests/lightning_strategy/test_strategy_runs.py``; (b) and (d) with
Lightning peers are ``tests/lightning_strategy/test_strategy_faults.py``.
"""

from __future__ import annotations

import pytest

from tests.support.core_runs import max_diff, peer_spec, run_peers, state_diff

STEPS = 8
TARGET = 96
TIMEOUTS = dict(averaging_timeout=6, matchmaking_time=2)


def _assert_identical(results: dict, steps: int = STEPS) -> float:
    """Every peer at ``steps`` with the same parameters and optimizer state; returns the largest difference."""
    names = sorted(results)
    assert {name: results[name]["local_step"] for name in names} == dict.fromkeys(names, steps)
    fingerprints = {results[name]["collaboration_state"]["fingerprint"] for name in names}
    reference = results[names[0]]["final"]
    worst = 0.0
    for name in names[1:]:
        final = results[name]["final"]
        worst = max(
            worst, max_diff(final["params"], reference["params"]), state_diff(final["state"], reference["state"])
        )
    healed = {name: results[name]["collaboration_state"]["forks_healed"] for name in names}
    downloads = {name: results[name]["collaboration_state"]["state_downloads"] for name in names}
    print(f"\nforks healed {healed}, downloads {downloads}, max difference {worst:.2e}, fingerprints {fingerprints}")
    assert worst <= 1e-6, {name: results[name]["log"][-3000:] for name in names}
    assert len(fingerprints) == 1
    return worst


def _log_mentions(result: dict, text: str) -> None:
    assert text in result["log"], f"the fault hook never fired: {text!r} not in the log"


def test_replicas_that_each_stepped_alone_are_found_forked_and_one_downloads_the_others_state(tmp_path):
    """The demo's failure: after an asymmetric round both peers took the same step on their own (here forced: each
    planner decides to step alone at step 3), then trained on at the same step numbers. Same step, different
    fingerprints: exactly one of them (every peer computes which) must download the other's state."""
    specs = [
        peer_spec("p0", 32, 100, STEPS, "--solo-at-step", "3", peers=2),
        peer_spec("p1", 32, 101, STEPS, "--solo-at-step", "3", peers=2),
    ]
    results = run_peers(tmp_path, "solo", specs, target_batch_size=64, **TIMEOUTS)
    for result in results.values():
        _log_mentions(result, "solo hook: stepping alone at step 3")
    _assert_identical(results)
    healed = [name for name, result in results.items() if result["collaboration_state"]["forks_healed"]]
    assert len(healed) == 1, healed
    assert "healed a fork of the replicas" in results[healed[0]]["log"]


def test_round_failing_as_it_starts_and_a_delayed_publication_leave_no_fork(tmp_path):
    """(b) p1's round of step 2 fails as it starts (the others get partial results); (c) from step 4 p2 publishes
    nothing for 3 s, so the others' views show its previous step while they run their next round."""
    specs = [
        peer_spec("p0", 32, 100, STEPS),
        peer_spec("p1", 16, 101, STEPS, "--fail-round-start-at-step", "2"),
        peer_spec("p2", 24, 102, STEPS, "--silent-after-step", "4", "--silent-seconds", "3"),
    ]
    results = run_peers(tmp_path, "startfail", specs, target_batch_size=TARGET, **TIMEOUTS)
    _log_mentions(results["p1"], "at its start")
    _log_mentions(results["p2"], "publication hook: silent for 3.0s")
    _assert_identical(results)
    assert results["p0"]["collaboration_state"]["failed_rounds"] >= 1  # the round of step 2 broke for the others too


@pytest.mark.parametrize("peers", [4])
def test_rounds_failing_after_the_exchange_on_two_of_four_and_a_frozen_peer_leave_no_fork(tmp_path, peers):
    """(e) the round of step 2 fails after the exchange on p1 and p2 at once (p0 and p3 applied it); (d) p3 is
    stopped (SIGSTOP, its whole process group) for longer than the averaging timeout in its round of step 5."""
    frozen_for = str(TIMEOUTS["averaging_timeout"] + 3)
    specs = [
        peer_spec("p0", 32, 100, STEPS, peers=peers),
        peer_spec("p1", 16, 101, STEPS, "--fail-round-at-step", "2", peers=peers),
        peer_spec("p2", 24, 102, STEPS, "--fail-round-at-step", "2", peers=peers),
        peer_spec("p3", 24, 103, STEPS, "--freeze-at-step", "5", "--freeze-seconds", frozen_for, peers=peers),
    ]
    results = run_peers(tmp_path, "twoofour", specs, target_batch_size=TARGET + 48, **TIMEOUTS)
    for name in ("p1", "p2"):
        _log_mentions(results[name], "after the exchange")
    _log_mentions(results["p3"], "freeze hook: SIGSTOP")
    _assert_identical(results)
    for name in ("p1", "p2"):
        assert results[name]["collaboration_state"]["state_downloads"] >= 1  # left the failed step by a download


def test_peer_cut_off_returning_to_idle_peers_downloads_instead_of_training_alone(tmp_path):
    """The partition story: a peer comes back to peers that finished and are idle (alive, serving, publishing
    nothing new). While it was cut off, the only state it could reach was its own, so their records ahead looked
    unbacked. It must believe them again after its download back-off, not train alone to their step number."""
    specs = [
        peer_spec("a", 32, 100, STEPS, "--finish-peers", "3", peers=2),
        peer_spec("b", 16, 101, STEPS, "--finish-peers", "3", peers=2),
        # it trains alone meanwhile (1 s per step), far slower than the 2 s cut: it must not reach their step alone
        peer_spec(
            "cut",
            24,
            102,
            STEPS,
            "--join-at-step",
            str(STEPS),
            "--cut-off-seconds",
            "2",
            "--finish-peers",
            "3",
            "--compute-seconds",
            "0.25",
        ),
    ]
    results = run_peers(tmp_path, "partition", specs, target_batch_size=TARGET, **TIMEOUTS)
    _log_mentions(results["cut"], "partition hook: only this peer's own state is reachable")
    _assert_identical(results)
    assert results["cut"]["collaboration_state"]["state_downloads"] >= 1


def test_replicas_forked_at_the_last_step_settle_it_when_they_leave(tmp_path):
    """The fork nobody trains on to see: both peers step alone at the last step (as when its round failed
    asymmetrically under load), then finish. Leaving settles it: the losing side downloads the kept state from the
    winner, which stays until it has; the state each keeps after ``shutdown()`` is the same."""
    last = STEPS - 1
    specs = [
        peer_spec("p0", 32, 100, STEPS, "--solo-at-step", str(last), peers=2),
        peer_spec("p1", 32, 101, STEPS, "--solo-at-step", str(last), peers=2),
    ]
    results = run_peers(tmp_path, "lastsolo", specs, target_batch_size=64, **TIMEOUTS)
    for result in results.values():
        _log_mentions(result, f"solo hook: stepping alone at step {last}")
    _assert_identical(results)
    healed = [name for name, result in results.items() if result["collaboration_state"]["forks_healed"]]
    assert len(healed) == 1, healed
