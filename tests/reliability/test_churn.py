"""Churn (issue 7, scenario 6): 4 peers, one leaving and a new one joining every few seconds.

A long-lived ``anchor`` trains the whole time; the test keeps 3 more peers running and, every ``CHURN_PERIOD``
seconds (counted from the moment the first 4 train together), stops one of them (alternately SIGTERM, a clean
leave, and SIGKILL of its process group, a crash) and starts a fresh one, which joins mid-run and downloads the
state. ``make test`` runs it for ``CHURN_SECONDS`` (30 s); ``make soak`` sets ``RELIABILITY_SOAK_SECONDS=180``.
The schedule is time-driven, but no assertion depends on timing: the checks are on what the peers recorded
(identical replicas, the anchor's steps and resources).
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.support.processes import PeerSet, bootstrap_dht, collab_env
from tests.support.reliability import group_ends, max_replica_diff, peer_args, start, wait_for_file

CHURN_SECONDS = float(os.environ.get("RELIABILITY_SOAK_SECONDS", "30"))
CHURN_PERIOD = 5.0
WARM_UP_SECONDS = 10.0  # the anchor's baseline resources are taken after this much training

pytestmark = [pytest.mark.slow, pytest.mark.timeout(CHURN_SECONDS + 200)]


def wait_until_ready(peer, peers: PeerSet) -> None:
    """A peer is stopped only once it has started (a signal during start-up would test the interpreter, not us)."""
    wait_for_file(peer.out.with_name(peer.out.name + ".ready"), peers, [peer], timeout=60)


def test_churn_keeps_replicas_identical_and_resources_flat(tmp_path):
    with bootstrap_dht() as dht:
        env = collab_env(
            dht, "churn", target_batch_size=128, averaging_timeout=5, matchmaking_time=1.5, metadata_expiration=15
        )
        env["COLLAB_VERBOSE"] = os.environ.get("RELIABILITY_SOAK_VERBOSE", "0")  # a long run: keep the logs small
        with PeerSet(tmp_path, env) as peers:
            anchor = start(peers, "anchor", peer_args(32, 0, peers=2))
            running = [start(peers, f"c{i}", peer_args(16 + 8 * i, i + 1, peers=2)) for i in range(3)]
            churners, events, serial = list(running), [], 3
            for peer in [anchor, *running]:
                wait_until_ready(peer, peers)  # the churn starts once the first 4 peers train together
            started = time.monotonic()
            while time.monotonic() - started < CHURN_SECONDS:
                time.sleep(CHURN_PERIOD)
                assert anchor.process.poll() is None, f"the anchor exited\n{peers.logs()}"
                leaving = running.pop(0)
                wait_until_ready(leaving, peers)
                how = signal.SIGTERM if serial % 2 else signal.SIGKILL
                if how == signal.SIGKILL:  # a crash of the machine: the peer's DHT and averager processes die too
                    os.killpg(leaving.process.pid, how)
                else:
                    leaving.process.send_signal(how)
                events.append((round(time.monotonic() - started, 1), leaving.name, how.name))
                joining = start(peers, f"c{serial}", peer_args(16 + 8 * (serial % 3), serial + 1, peers=1))
                running.append(joining)
                churners.append(joining)
                serial += 1
            for peer in [anchor, *running]:
                wait_until_ready(peer, peers)
                peer.process.send_signal(signal.SIGTERM)
            for peer in [anchor, *churners]:
                peer.process.wait(60)
            leftovers = [peer.name for peer in [anchor, *churners] if not group_ends(peer.process.pid)]
            clean = [peer for peer in [anchor, *churners] if peer.process.returncode == 0]
            results = {peer.name: peer.result() for peer in clean}
    anchor_result = results["anchor"]
    worst, compared = max_replica_diff(results.values())
    samples = anchor_result["resources"]
    t0 = samples[0]["time"]
    baseline = next((s for s in samples if s["time"] - t0 >= WARM_UP_SECONDS), samples[-1])
    end = samples[-1]
    rss_growth = (end["rss"] - baseline["rss"]) / baseline["rss"]
    tree = (end["rss"] + end["children_rss"]) / (baseline["rss"] + baseline["children_rss"]) - 1
    print(
        f"\nchurn {CHURN_SECONDS:.0f}s: {len(events)} leave/join events, anchor took "
        f"{anchor_result['local_step']} steps "
        f"({anchor_result['collaboration_state']['state_downloads']} downloads), max difference among peers sharing a "
        f"step {worst:.2e} ({compared} comparisons, {len(results)} peers with results); anchor RSS "
        f"{baseline['rss'] / 2**20:.1f} -> {end['rss'] / 2**20:.1f} MiB ({100 * rss_growth:+.1f}%), with children "
        f"{100 * tree:+.1f}%, fds {baseline['fds']} -> {end['fds']}, children {baseline['children']} -> "
        f"{end['children']}, threads {baseline['threads']} -> {end['threads']}; events {events}"
    )
    assert not leftovers, f"processes left behind by {leftovers}"
    assert all(peer.process.returncode in (0, -9) for peer in churners)  # clean leaves and the SIGKILLed ones
    assert anchor_result["left_by"] == "SIGTERM"
    assert anchor_result["local_step"] >= CHURN_SECONDS / 3  # it kept training through the churn
    assert compared >= 5  # churners that trained long enough to share steps with others
    assert worst <= 1e-6
    assert rss_growth <= 0.10
    assert end["fds"] <= baseline["fds"] + 8  # no descriptor leak (a few sockets come and go with the peers)
    assert end["children"] == baseline["children"]  # no child process leak (DHT, averager, p2p daemons)
