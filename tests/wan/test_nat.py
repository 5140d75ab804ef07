"""Scenario 2: a peer behind a home router (a namespace doing NAT with iptables MASQUERADE).

Nothing can open a connection to it (``tests/wan/test_netbed.py`` checks that with plain TCP). With ``client_mode``
it dials out only and contributes to every step; without it, the start-up reachability check tells it that it
cannot accept connections and what to do; what then happens to its training is measured and printed. Relays
(``use_relay`` / ``use_auto_relay``): see README "Over the internet" (what hivemind 1.1.12 does with them).
"""

from __future__ import annotations

from tests.support.reliability import max_replica_diff, peer_args
from tests.support.wan import WanPeers, bridge_dht, wan_env

TIMEOUT = 120
ADVICE = "[collaborative] reachability:"


def test_nat_peer_contributes_in_client_mode(netbed, tmp_path):
    steps = 4
    netbed.add_peer("a", rate_mbit=20)
    netbed.add_router("r1", rate_mbit=20)
    netbed.add_peer("n", behind="r1")
    with bridge_dht() as dht:
        env = wan_env(dht, "wannat", target_batch_size=64, averaging_timeout=10, matchmaking_time=2)
        with WanPeers(tmp_path, env, netbed) as peers:
            public = peers.start_in("a", peer_args(16, 1, "--finish-peers", "2", steps=steps, peers=2))
            natted = peers.start_in(
                "n", peer_args(16, 2, "--finish-peers", "2", steps=steps, peers=2), env={"COLLAB_CLIENT_MODE": "1"}
            )
            peers.wait([public, natted], timeout=TIMEOUT)
            results = {peer.name: peer.result() for peer in (public, natted)}
            logs = peers.logs()
    worst, compared = max_replica_diff(results.values())
    n_id = results["n"]["peer_id"]
    contributed = sorted(s for s, members in results["a"]["participants"].items() if n_id in members)
    print(f"\nNAT'd client: contributed to steps {contributed} of {steps}; max diff {worst:.2e} over {compared}")
    assert ADVICE not in results_log(logs, "n")  # a client needs no inbound connections: nothing to advise
    assert len(contributed) >= steps - 1, logs  # the first step may be taken before the client's samples arrive
    assert compared >= steps - 1 and worst <= 1e-6


def test_nat_peer_without_client_mode_is_told_it_cannot_accept_connections(netbed, tmp_path):
    netbed.add_peer("a", rate_mbit=20)
    netbed.add_router("r1", rate_mbit=20)
    netbed.add_peer("s", behind="r1")
    with bridge_dht() as dht:
        env = wan_env(dht, "wannats", target_batch_size=64, averaging_timeout=5, matchmaking_time=2)
        with WanPeers(tmp_path, env, netbed) as peers:
            public = peers.start_in("a", peer_args(16, 1, "--finish-peers", "2", steps=3, peers=2))
            server = peers.start_in("s", peer_args(16, 2, "--finish-peers", "2", steps=3, peers=2))
            try:
                peers.wait([public, server], timeout=TIMEOUT)
                outcome = "finished"
            except AssertionError as e:
                outcome = f"did not finish: {str(e).splitlines()[0]}"
            log = server.log_text()
            public_log = public.log_text()
            results = {p.name: p.result() for p in (public, server) if p.out.exists()}
    advice = next(line for line in log.splitlines() if ADVICE in line)
    print(f"\nNAT'd peer without client mode: {advice}\ntraining: {outcome}")
    if "a" in results and "s" in results:
        s_id = results["s"]["peer_id"]
        together = sorted(step for step, m in results["a"]["participants"].items() if s_id in m)
        print(f"steps the public peer took with it: {together}; max diff {max_replica_diff(results.values())[0]:.2e}")
    assert "cannot accept connections" in advice
    assert "COLLAB_CLIENT_MODE=1" in advice and "COLLAB_ANNOUNCE_MADDRS" in advice
    assert ADVICE not in public_log  # the public peer is on the swarm's network: nothing to advise


def results_log(logs: str, name: str) -> str:
    """The part of ``PeerSet.logs()`` that is peer ``name``'s log."""
    return logs.split(f"----- {name} -----", 1)[1].split("\n----- ", 1)[0]
