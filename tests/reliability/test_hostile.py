"""Hostile and broken input (issue 7, scenarios 7-9), in one shared run.

On one bootstrap DHT: run ``honest`` (peers ``h1``, ``h2`` and ``nan``, which sends NaN gradients toward step 2), a
hostile process publishing forged progress records under ``honest``'s key (``tests/peers/hostile_peer.py``), and a
second run ``other`` (``o1``, ``o2``). Every participant is a separate OS process; the forged records are published
before any honest peer starts, so every honest peer sees them from its first step on.
"""

from __future__ import annotations

import pytest
import torch

from tests.support.processes import REPO_ROOT, PeerSet, bootstrap_dht, collab_env
from tests.support.reliability import all_finite, max_replica_diff, peer_args, start, tensor_diff, wait_for_file

pytestmark = pytest.mark.slow

HOSTILE_PEER = REPO_ROOT / "tests" / "peers" / "hostile_peer.py"
STEPS, TARGET, NAN_STEP, HUGE_STEPS = 6, 144, 2, 3
TIMEOUT = 150


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    """Run both collaborations to completion next to the forger; return every peer's results and logs."""
    tmp_path = tmp_path_factory.mktemp("hostile")
    with bootstrap_dht() as dht:
        settings = dict(target_batch_size=TARGET, averaging_timeout=5, matchmaking_time=1.5)
        env = collab_env(dht, "honest", **settings)
        with PeerSet(tmp_path, env) as peers:
            forger = peers.start(
                "forger",
                ["--initial-peers", env["COLLAB_INITIAL_PEERS"], "--run-id", "honest", "--huge-steps", str(HUGE_STEPS)],
                script=HOSTILE_PEER,
            )
            wait_for_file(forger.out, peers, [forger], timeout=60)  # every record is out before honest peers start
            common = dict(steps=STEPS, peers=3)
            honest = [
                start(peers, "h1", peer_args(32, 1, "--finish-peers", "3", **common)),
                start(peers, "h2", peer_args(16, 2, "--finish-peers", "3", **common)),
                start(peers, "nan", peer_args(24, 3, "--nan-at-step", str(NAN_STEP), "--finish-peers", "3", **common)),
            ]
            other_env = {"COLLAB_RUN_ID": "other", "COLLAB_TARGET_BATCH_SIZE": "96"}
            other = [
                start(peers, "o1", peer_args(32, 4, "--finish-peers", "2", steps=4, peers=2), env=other_env),
                start(peers, "o2", peer_args(16, 5, "--finish-peers", "2", steps=4, peers=2), env=other_env),
            ]
            peers.wait([*honest, *other], timeout=TIMEOUT)
            assert forger.process.poll() is None, "the forger exited early"
            return {
                "published": forger.result(),
                "results": {peer.name: peer.result() for peer in [*honest, *other]},
                "logs": {peer.name: peer.log_text() for peer in [*honest, *other]},
            }


def test_forged_progress_records_never_make_honest_peers_step_early(hostile_run):
    """Scenario 7."""
    results, logs = hostile_run["results"], hostile_run["logs"]
    print(f"\nforged records published (kind: accepted by the forger's DHT): {hostile_run['published']}")
    short = {name: results[name]["collaboration_state"]["short_rounds"] for name in ("h1", "h2", "nan")}
    samples = {name: results[name]["round_samples"] for name in ("h1", "h2")}
    print(f"short rounds refused: {short}; samples per applied step: {samples}")
    for name in ("h1", "h2"):
        result = results[name]
        assert result["local_step"] == STEPS  # kept training
        assert result["round_samples"], "took no step in a round"
        # never stepped early: every step it took in a round averaged at least target_batch_size real samples
        assert min(result["round_samples"].values()) >= TARGET, result["round_samples"]
        # the records that pass hivemind's schema check are skipped with a warning
        for reason in ("non-finite values", "stamped in the future", "an oversized peer id"):
            assert f"Ignoring a progress record with {reason}" in logs[name], reason
    # the forged counts were believed for a moment, and the resulting round refused (not applied) by its members
    assert sum(short.values()) >= 1
    worst, compared = max_replica_diff(results[name] for name in ("h1", "h2", "nan"))
    assert compared >= 2 * STEPS and worst <= 1e-6


def test_nan_gradients_are_skipped_on_every_replica(hostile_run):
    """Scenario 8: the NaN peer's round is detected before the averaged gradient is applied, on every member.

    A member whose round of that step failed on its side (after the exchange, so the others completed it) reaches the
    next step by a state download instead: it saw no NaN to skip, and its replica is checked against the others."""
    results, logs = hostile_run["results"], hostile_run["logs"]
    members = [results[name] for name in ("h1", "h2", "nan")]
    in_round = [result for result in members if NAN_STEP in result["participants"]]
    assert len(in_round) >= 2, {r["name"]: (sorted(r["participants"]), r["download_steps"]) for r in members}
    for result in members:
        assert all_finite(result)
        assert result["local_step"] == STEPS
        if result not in in_round:  # came to the step after the NaN round by a download of the others' state
            assert any(step > NAN_STEP for step in result["download_steps"]), (result["name"], result["download_steps"])
            assert result["collaboration_state"]["nonfinite_steps"] == 0
            continue
        assert result["collaboration_state"]["nonfinite_steps"] == 1
        assert "contains inf/NaN" in logs[result["name"]]
        before, after = result["per_step"][NAN_STEP], result["per_step"][NAN_STEP + 1]
        assert tensor_diff(before["params"], after["params"]) == 0.0  # skipped: parameters unchanged ...
        assert after["params"] != []  # ... the step still counted
    worst, compared = max_replica_diff(members)
    print(
        f"\nNaN round skipped by {len(in_round)} of 3 peers (the others downloaded); replicas finite and within "
        f"{worst:.2e} ({compared} comparisons)"
    )
    assert worst <= 1e-6


def test_two_runs_on_one_dht_never_mix(hostile_run):
    """Scenario 9: the peers of run ``other`` never see or average with the peers of run ``honest``."""
    results = hostile_run["results"]
    ids = {
        run: {results[name]["peer_id"] for name in names}
        for run, names in {"honest": ("h1", "h2", "nan"), "other": ("o1", "o2")}.items()
    }
    for run, names in {"honest": ("h1", "h2", "nan"), "other": ("o1", "o2")}.items():
        for name in names:
            for step, members in results[name]["participants"].items():
                assert members <= ids[run], (name, step, members)
    for name in ("o1", "o2"):
        assert results[name]["max_peers_seen"] == 2
        assert results[name]["local_step"] == 4
    assert max(len(m) for m in results["o1"]["participants"].values()) == 2
    assert tensor_diff(results["o1"]["final"]["params"], results["o2"]["final"]["params"]) <= 1e-6
    # the two runs started from the same initial model and trained on different data: they really are separate
    assert tensor_diff(results["o1"]["final"]["params"], results["h1"]["final"]["params"]) > 1e-3
    assert torch.is_tensor(results["o1"]["final"]["params"][0])
