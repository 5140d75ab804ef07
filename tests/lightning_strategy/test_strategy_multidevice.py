"""``Trainer(strategy="collaborative", devices=2)``: two local processes (DDP over gloo) are one collaborative peer.

A real run on loopback: peer "duo" (2 local processes, started by Lightning's launcher) and peer "solo" (1 device),
each a separate OS process tree that the test ends. Checked against the records of all three processes and a
single-process replay in which duo's contribution to a step is the micro-batches of both its processes together.
"""

from __future__ import annotations

import pytest
import torch

from tests.support.lightning_replay import BASE_LR, as_one_peer, max_diff, replay
from tests.support.processes import REPO_ROOT, PeerSet, bootstrap_dht, collab_env
from tests.support.round_contributions import round_contributions

PEER = REPO_ROOT / "tests" / "peers" / "lightning_multidevice_peer.py"
STEPS = 3
BATCH = 8
TARGET = 48  # per call duo reports 2 x 8 samples, solo 8: two calls each per collaborative step
TIMEOUT = 180


@pytest.fixture(scope="module")
def duo_and_solo(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("multidevice")
    common = ["--peers", "2", "--steps", str(STEPS), "--batch-size", str(BATCH)]
    settings = dict(target_batch_size=TARGET, averaging_timeout=20, matchmaking_time=2)
    with bootstrap_dht() as dht, PeerSet(workdir, collab_env(dht, "multidevice", **settings)) as peers:
        duo = peers.start(
            "duo", [*common, "--devices", "2", "--data-seed", "1", "--ckpt-out", str(workdir / "duo.ckpt")], script=PEER
        )
        solo = peers.start("solo", [*common, "--devices", "1", "--data-seed", "2"], script=PEER)
        peers.wait([duo, solo], timeout=TIMEOUT)  # duo's rank 0 exits once both its processes saved
        duo_ranks = [duo.result(), torch.load(f"{duo.out}.rank1", weights_only=False)]
        return {
            "duo": duo_ranks,
            "solo": solo.result(),
            "checkpoint": torch.load(workdir / "duo.ckpt", weights_only=False),
        }


@pytest.mark.slow
def test_two_local_processes_are_one_peer_and_only_rank_zero_collaborates(duo_and_solo):
    rank0, rank1 = duo_and_solo["duo"]
    solo = duo_and_solo["solo"]
    assert rank0["strategy_class"] == rank1["strategy_class"] == "CollaborativeMultiDeviceStrategy"
    assert solo["strategy_class"] == "CollaborativeStrategy"
    assert rank0["had_dht"] and not rank1["had_dht"]  # one DHT node (and averager) for the two processes
    assert rank1["peer_id"] is None and rank1["contributions"] == {}
    assert rank0["collaborative_step"] == rank1["collaborative_step"] == solo["collaborative_step"] == STEPS
    for step in range(STEPS):
        assert set(round_contributions([rank0, solo], step)) == {rank0["peer_id"], solo["peer_id"]}


@pytest.mark.slow
def test_the_peer_reports_the_samples_of_both_processes(duo_and_solo):
    rank0, rank1 = duo_and_solo["duo"]
    for step, averaged in rank0["contributions"].items():
        calls_of_rank0 = sum(1 for k, _x, _y in rank0["batches"] if k == step)
        calls_of_rank1 = sum(1 for k, _x, _y in rank1["batches"] if k == step)
        assert calls_of_rank0 == calls_of_rank1
        assert averaged[rank0["peer_id"]] == 2 * BATCH * calls_of_rank0  # per-process batch x 2 processes


@pytest.mark.slow
def test_all_three_processes_hold_identical_weights_and_learning_rates(duo_and_solo):
    rank0, rank1 = duo_and_solo["duo"]
    solo = duo_and_solo["solo"]
    assert max_diff(rank0["final"], rank1["final"]) <= 1e-6
    assert max_diff(rank0["final"], solo["final"]) <= 1e-6
    for step in range(1, STEPS + 1):  # after every collaborative step, not only at the end
        assert max_diff(rank0["per_step"][step]["params"], rank1["per_step"][step]["params"]) <= 1e-6
        assert rank0["per_step"][step]["lr"] == rank1["per_step"][step]["lr"]
    assert rank0["final_lr"] == rank1["final_lr"] == solo["final_lr"]


@pytest.mark.slow
def test_result_equals_single_process_replay_of_all_samples(duo_and_solo):
    """Duo's gradient is DDP's mean over its two processes, weighted by their summed samples across peers."""
    results = {"duo": as_one_peer(duo_and_solo["duo"]), "solo": duo_and_solo["solo"]}
    reference = list(replay(results, STEPS).parameters())
    for result in [*duo_and_solo["duo"], duo_and_solo["solo"]]:
        assert max_diff(result["final"], reference) <= 1e-5


@pytest.mark.slow
def test_checkpoint_is_written_by_rank_zero_with_the_collaborative_step(duo_and_solo):
    checkpoint = duo_and_solo["checkpoint"]
    state = checkpoint["optimizer_states"][0]
    assert state["local_step"] == STEPS and "fingerprint" in state  # the collaborative optimizer's, not a follower's
    weights = list(checkpoint["state_dict"].values())
    assert max_diff(weights, duo_and_solo["duo"][0]["final"]) == 0.0
    assert checkpoint["lr_schedulers"][0]["last_epoch"] == STEPS
    assert BASE_LR * 0.5 ** (STEPS // 2) == duo_and_solo["duo"][0]["final_lr"]
