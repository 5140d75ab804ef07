"""Faults (issue 7, scenarios 1-3): peers killed at the worst moments, a stalled all-reduce, a dying state server.

Every peer is a separate OS process with its own DHT node and averager on loopback (``tests/peers/
reliability_peer.py``); faults are injected by the peer itself at a given collaborative step, so each run takes the
same path. Tests assert on what the survivors recorded, never on sleeps.
"""

from __future__ import annotations

import re
import signal

import pytest

from tests.support.processes import PeerSet, bootstrap_dht, collab_env
from tests.support.reliability import all_finite, longest_gap, max_replica_diff, peer_args, snapshot_diff, start

pytestmark = pytest.mark.slow

TIMEOUT = 120


def test_killed_peers_do_not_stall_or_split_survivors(tmp_path):
    """Scenario 1: of 4 peers, one is SIGKILLed right after step 2, another inside the all-reduce of step 4."""
    steps, averaging_timeout, matchmaking_time, request_timeout = 7, 4.0, 2.0, 1.0
    with bootstrap_dht() as dht:
        env = collab_env(
            dht, "kills", target_batch_size=192, averaging_timeout=averaging_timeout, matchmaking_time=matchmaking_time
        )
        with PeerSet(tmp_path, env) as peers:
            common = dict(steps=steps, peers=4)
            a = start(peers, "a", peer_args(32, 1, "--finish-peers", "2", **common))
            b = start(peers, "b", peer_args(16, 2, "--finish-peers", "2", **common))
            crash = start(peers, "crash", peer_args(24, 3, "--kill-after-step", "2", **common))
            victim = start(peers, "victim", peer_args(24, 4, "--die-at-step", "4", **common))
            peers.wait([a, b], timeout=TIMEOUT)
            assert crash.process.wait(10) == -9 and "kill hook" in crash.log_text()
            assert victim.process.wait(10) == -9 and "die hook" in victim.log_text()
            results = [a.result(), b.result()]
    worst, compared = max_replica_diff(results)
    longest_call = max(r["longest_call"] for r in results)
    gap = max(longest_gap(r) for r in results)
    print(
        f"\nkills: survivors at step {[r['local_step'] for r in results]}, max difference {worst:.2e} over "
        f"{compared} shared steps, longest step() call {longest_call:.2f}s, longest time between steps "
        f"{gap:.2f}s (averaging_timeout {averaging_timeout}s + matchmaking_time {matchmaking_time}s), "
        f"failed rounds {[r['collaboration_state']['failed_rounds'] for r in results]}"
    )
    for result in results:
        assert result["local_step"] == steps
        assert all_finite(result)
    assert compared >= steps - 1
    assert worst <= 1e-6
    assert any(r["collaboration_state"]["failed_rounds"] >= 1 for r in results)  # the lost round is reported
    # one step() call waits at most one matchmaking window + averaging_timeout (+ the requests around them)
    assert longest_call <= matchmaking_time + averaging_timeout + 2 * request_timeout + 2.0


def test_state_server_failing_mid_transfer(tmp_path):
    """Scenario 2: the peer a joiner downloads from first ends the transfer early, then dies in the middle of it.

    The truncated state must be refused as a whole (a clear warning, nothing loaded, a later retry); on the second
    try the server is SIGKILLed mid-stream and the joiner gets the state from the other peer.
    """
    steps_after = 4
    with bootstrap_dht() as dht:
        env = collab_env(dht, "download", target_batch_size=96, averaging_timeout=5, matchmaking_time=2)
        with PeerSet(tmp_path, env) as peers:
            # 'a' trains until it is stopped; a joiner asks 'server' first (state-sharing priorities step -3 / +3)
            a = start(peers, "a", peer_args(32, 1, "--state-priority-offset", "-3", peers=2))
            server = start(
                peers, "server", peer_args(16, 2, "--bad-state-server", "3", "--state-priority-offset", "3", peers=2)
            )
            joiner = start(
                peers,
                "joiner",
                peer_args(24, 3, "--join-at-step", "2", "--steps-after-download", str(steps_after), peers=2),
            )
            peers.wait([joiner], timeout=TIMEOUT)
            a.process.send_signal(signal.SIGTERM)  # leaves cleanly and writes its results
            peers.wait([a], timeout=30)
            # it trains until stopped, so only the hook can have ended it (by now: the joiner finished after it)
            assert server.process.wait(10) == -9 and "SIGKILL after streaming" in server.log_text()
            joiner_log = joiner.log_text()
            results = {"a": a.result(), "joiner": joiner.result()}
    joined = results["joiner"]
    assert "the downloaded state is incomplete" in joiner_log and "nothing was loaded" in joiner_log
    attempts = re.findall(r"Downloading the state from peer (\w+)", joiner_log)
    finished = re.findall(r"Downloaded the state from peer (\w+) in [\d.]+s", joiner_log)
    assert len(attempts) >= 3 and attempts[0] == attempts[1] != results["a"]["peer_id"]  # the bad server, twice
    assert finished[-1] == results["a"]["peer_id"]  # ... then the state came from the other peer
    assert joined["collaboration_state"]["state_downloads"] >= 1
    # until its first complete download the joiner trained alone on its own initial state (never on a partial one)
    first = joined["download_steps"][0]
    synced = {**joined, "per_step": {k: v for k, v in joined["per_step"].items() if k >= first}}
    worst, compared = max_replica_diff([results["a"], synced])
    print(
        f"\nstate server failing: joiner's first complete download at step {first}, downloads "
        f"{joined['collaboration_state']['state_downloads']}, max difference to 'a' {worst:.2e} over {compared} steps"
    )
    assert first >= 2
    assert compared >= steps_after
    assert worst <= 1e-6  # a half-loaded state would differ from 'a' at the first step and ever after
    assert any(step >= first for step in joined["participants"])  # it trained (contributed) after joining


def test_peer_missing_an_allreduce_resynchronizes(tmp_path):
    """Scenario 3: one peer's averager freezes in the all-reduce of step 3 for longer than every timeout."""
    averaging_timeout, matchmaking_time = 2.0, 1.5
    with bootstrap_dht() as dht:
        env = collab_env(
            dht, "missed", target_batch_size=144, averaging_timeout=averaging_timeout, matchmaking_time=matchmaking_time
        )
        with PeerSet(tmp_path, env) as peers:
            # 'a' and 'b' train until stopped; the staller stops 2 steps after it re-synchronised
            started = [
                start(peers, "a", peer_args(32, 1, peers=3)),
                start(peers, "b", peer_args(16, 2, peers=3)),
                start(
                    peers,
                    "staller",
                    peer_args(
                        24, 3, "--stall-at-step", "3", "--stall-seconds", "8", "--steps-after-download", "2", peers=3
                    ),
                ),
            ]
            peers.wait(started[2:], timeout=TIMEOUT)
            for peer in started[:2]:
                peer.process.send_signal(signal.SIGTERM)  # they leave cleanly and write their results
            peers.wait(started, timeout=30)
            assert "stall hook" in started[2].log_text()
            results = {peer.name: peer.result() for peer in started}
    staller = results["staller"]
    worst, compared = max_replica_diff(results.values())
    state = staller["collaboration_state"]
    print(
        f"\nmissed all-reduce: staller failed rounds {state['failed_rounds']}, downloads {state['state_downloads']}, "
        f"max difference among replicas {worst:.2e} over {compared} comparisons"
    )
    assert state["failed_rounds"] >= 1
    assert state["state_downloads"] >= 1  # it re-synchronised from the others ...
    assert 3 not in staller["participants"]  # ... having missed step 3
    later = [step for step, members in staller["participants"].items() if step > 3 and staller["peer_id"] in members]
    assert later, "the staller never contributed again"
    assert worst <= 1e-6  # ... and no replica ever drifted: every step any two peers share is identical
    assert all(all_finite(result) for result in results.values())


def test_peer_leaving_right_after_its_last_step_stays_until_its_groupmates_have_it(tmp_path):
    """A peer that finishes (and shuts down) right after a step waits until its groupmates have that step too.

    The other peer's round of the last step fails after the exchange (as when hivemind's last message of a round is
    lost: the leaving peer's all-reduce returns once *it* has its parts). Had the leaver shut down at once, the other
    peer would retry the step alone, from other gradients, and end with different weights (what the demo showed
    under load); the leaver stays, so the other peer downloads its state instead.
    """
    steps = 3
    with bootstrap_dht() as dht:
        env = collab_env(dht, "leaving", target_batch_size=96, averaging_timeout=5, matchmaking_time=2)
        with PeerSet(tmp_path, env) as peers:
            leaver = start(peers, "leaver", peer_args(32, 1, steps=steps, peers=2))
            stayer = start(
                peers, "stayer", peer_args(16, 2, "--fail-round-at-step", str(steps - 1), steps=steps, peers=2)
            )
            peers.wait([leaver, stayer], timeout=TIMEOUT)
            hook_fired = "round hook" in stayer.log_text()
            results = {"leaver": leaver.result(), "stayer": stayer.result()}
    leaver_result, stayer_result = results["leaver"], results["stayer"]
    difference = snapshot_diff(leaver_result["final"], stayer_result["final"])
    state = stayer_result["collaboration_state"]
    print(
        f"\nleaving right after a step: stayer at step {stayer_result['local_step']}, failed rounds "
        f"{state['failed_rounds']}, downloads {state['state_downloads']}, forks healed "
        f"{state['forks_healed'] + leaver_result['collaboration_state']['forks_healed']}, final difference to the "
        f"leaver {difference:.2e}, round hook fired: {hook_fired}"
    )
    assert leaver_result["local_step"] == stayer_result["local_step"] == steps
    assert difference <= 1e-6
    if hook_fired:  # it got the last step from the leaver
        assert state["failed_rounds"] == 1 and state["state_downloads"] == 1
    else:
        # Under heavy load the last round may not form at all, asymmetrically (hivemind: one side "could not find
        # a group", the other broke mid-way): both took the step alone, and leaving settled that fork (seen in a
        # full-suite run; forced deterministically in tests/core/test_fork_healing.py). Identical all the same.
        assert state["failed_rounds"] >= 1
