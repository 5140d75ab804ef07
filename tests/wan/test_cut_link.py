"""Scenario 3: a peer's link is cut for 20 s (``ip link set down``) and restored.

The others keep training after at most one round's timeouts and never split; the cut peer re-synchronises (downloads
the state) and contributes again, an identical replica from its download on.

Which side of a partition wins is decided by step numbers (the side ahead serves its state): the cut peer is made to
compute slowly, so that alone it falls behind. Made fast, it ran ahead alone and the others downloaded its solo fork
(README "Over the internet").
"""

from __future__ import annotations

import signal
import subprocess
import time

from tests.support.reliability import all_finite, max_replica_diff, peer_args
from tests.support.wan import WanPeers, bridge_dht, step_of, wait_until, wan_env

TIMEOUT = 150
CUT_SECONDS = 20.0
RESYNC_TIMEOUT = 45.0  # after the restore: a download plus two rounds, with room for a loaded machine


def test_cut_link_others_go_on_and_the_cut_peer_resynchronises(netbed, tmp_path):
    averaging_timeout, matchmaking_time = 5.0, 2.0
    request_timeout = min(3.0, matchmaking_time / 2)  # what the collaboration gives hivemind (optimizer.py)
    for name in ("a", "b", "c"):
        netbed.add_peer(name, rate_mbit=20)
    with bridge_dht() as dht:
        env = wan_env(
            dht,
            "wancut",
            target_batch_size=96,
            averaging_timeout=averaging_timeout,
            matchmaking_time=matchmaking_time,
        )
        with WanPeers(tmp_path, env, netbed) as peers:
            step_files = {name: tmp_path / f"{name}.step" for name in ("a", "b", "c")}
            survivors = [
                peers.start_in(name, peer_args(16, seed, "--step-file", str(step_files[name]), peers=3))
                for seed, name in ((1, "a"), (2, "b"))
            ]
            # 'c' computes slowly (1 s per micro-batch of 16, 6 per step alone), so that alone, cut off, it takes
            # fewer steps than the others: which side wins after a partition is decided by the step number (the
            # side ahead serves its state), see the assertions below and README "Over the internet"
            cut = peers.start_in(
                "c", peer_args(16, 3, "--steps-after-download", "2", "--compute-seconds", "1.0", peers=3)
            )
            wait_until(lambda: step_of(step_files["a"]) >= 2, TIMEOUT, "the collaboration did not reach step 2", peers)
            netbed.cut("c")
            cut_at, step_at_cut = time.monotonic(), step_of(step_files["a"])
            # during the cut the others go on: two more steps, each within one round's timeouts
            bound = matchmaking_time + averaging_timeout + 2 * request_timeout + 5.0
            wait_until(
                lambda: step_of(step_files["a"]) >= step_at_cut + 2,
                2 * bound,
                "the others did not go on training while the link was cut",
                peers,
            )
            time.sleep(max(0.0, CUT_SECONDS - (time.monotonic() - cut_at)))  # the cut lasts 20 s: the scenario
            netbed.restore("c")
            restored_at = time.monotonic()
            try:  # it leaves by itself 2 round steps after its first download ...
                cut.process.wait(RESYNC_TIMEOUT)
            except subprocess.TimeoutExpired:  # ... or it never re-synchronised: stop it and look at what it did
                cut.process.send_signal(signal.SIGTERM)
            for peer in survivors:
                peer.process.send_signal(signal.SIGTERM)
            peers.wait(timeout=60)
            results = {peer.name: peer.result() for peer in [*survivors, cut]}
            logs = peers.logs()
    c, a, b = results["c"], results["a"], results["b"]
    times = sorted(a["step_times"].values())
    pairs = zip(times, times[1:], strict=False)
    gaps_in_cut = [later - earlier for earlier, later in pairs if later > cut_at and earlier < restored_at]
    state = c["collaboration_state"]
    first_download = c["download_steps"][0] if c["download_steps"] else None
    later = [
        s
        for s, members in c["participants"].items()
        if first_download is not None and s >= first_download and len(members) > 1 and c["peer_id"] in members
    ]
    solo = sorted(s for s, members in c["participants"].items() if len(members) == 1)
    survivors_diff, survivors_compared = max_replica_diff([a, b])
    resynced = {**c, "per_step": {s: v for s, v in c["per_step"].items() if s >= (first_download or 10**9)}}
    after_diff, after_compared = max_replica_diff([a, resynced])
    print(
        f"\ncut link: 'a' at step {a['local_step']}, {sum(cut_at < t < restored_at for t in times)} steps during "
        f"the cut, longest gap {max(gaps_in_cut, default=0):.2f}s (bound {bound:.1f}s); 'c' failed rounds "
        f"{state['failed_rounds']}, solo steps while cut off {solo}, downloads {state['state_downloads']} at steps "
        f"{c['download_steps']}, contributed again at steps {later}; 'a' vs 'b' {survivors_diff:.2e} over "
        f"{survivors_compared} steps, 'c' vs 'a' after its download {after_diff:.2e} over {after_compared} steps"
    )
    # the others went on: no step of theirs waited longer than one round's timeouts while the link was cut
    assert max(gaps_in_cut) <= bound, logs
    assert a["local_step"] >= step_at_cut + 2
    assert all(all_finite(r) for r in results.values())
    assert survivors_compared >= a["local_step"] - 1 and survivors_diff <= 1e-6  # the others never split
    # the cut peer re-synchronised (downloaded the state: the collaboration, not its solo fork, was ahead) and
    # contributed again ...
    assert state["state_downloads"] >= 1 and later, logs
    # ... and from its download on it is an identical replica. While cut off it saw nobody and stepped alone (as a
    # peer whose partners all died would): those steps are a fork of the cut's length, healed by that download.
    assert after_compared >= 2 and after_diff <= 1e-6, logs
