"""Scenario 1: three peers, each on its own 20 Mbit/s link, train together and stay identical replicas."""

from __future__ import annotations

from tests.support.reliability import all_finite, max_replica_diff, peer_args
from tests.support.wan import WanPeers, bridge_dht, wan_env

TIMEOUT = 120


def test_three_peers_on_20_mbit_links_train_as_identical_replicas(netbed, tmp_path):
    steps = 5
    for name in ("a", "b", "c"):
        netbed.add_peer(name, rate_mbit=20)
    with bridge_dht() as dht:
        env = wan_env(dht, "wan3", target_batch_size=96, averaging_timeout=10, matchmaking_time=2)
        with WanPeers(tmp_path, env, netbed) as peers:
            started = [
                peers.start_in(name, peer_args(16, seed, "--finish-peers", "3", steps=steps, peers=3))
                for seed, name in enumerate(("a", "b", "c"), start=1)
            ]
            peers.wait(started, timeout=TIMEOUT)
            results = [peer.result() for peer in started]
            logs = peers.logs()
    worst, compared = max_replica_diff(results)
    rounds = [sum(len(m) for m in r["participants"].values()) for r in results]
    print(
        f"\n20 Mbit/s x3: steps {[r['local_step'] for r in results]}, max diff {worst:.2e} over {compared}, {rounds=}"
    )
    assert all(r["local_step"] == steps for r in results), logs
    assert compared >= 3 * (steps - 1)
    assert worst <= 1e-6
    assert all(all_finite(r) for r in results)
    # the steps were taken together: every peer was in a round with the other two
    for result in results:
        assert any(len(members) == 3 for members in result["participants"].values()), logs
