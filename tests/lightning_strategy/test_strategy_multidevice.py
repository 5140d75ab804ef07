"""``Trainer(strategy="collaborative", devices=2)``: two local processes (DDP over gloo) are one collaborative peer.

A real run on loopback: peer "duo" (2 local processes, started by Lightning's launcher; client mode, reused gradient
buffers) and peer "solo" (1 device), each a separate OS process tree that the test ends. Duo's round of step
``FAILED_ON_DUO`` fails on its side only, so it leaves that step by a state download (solo holds at the next step
until duo is there). Checked against the records of all three processes and a single-process replay in which duo's
contribution to a step is the micro-batches of both its processes together. Then duo's processes resume from its
checkpoint (written by rank 0) with ``ckpt_path``, in a new Trainer (bf16-mixed), alone.
"""

from __future__ import annotations

import pytest
import torch

from tests.peers.core_peer import failed_round_step
from tests.peers.lightning_peer import lr_factor
from tests.support.lightning_replay import BASE_LR, as_one_peer, max_diff, replay
from tests.support.processes import REPO_ROOT, PeerSet, bootstrap_dht, collab_env
from tests.support.round_contributions import round_contributions

PEER = REPO_ROOT / "tests" / "peers" / "lightning_multidevice_peer.py"
STEPS = 4
FAILED_ON_DUO = 1
BATCH = 8
TARGET = 48  # per call duo reports 2 x 8 samples, solo 8: two calls each per collaborative step
TIMEOUT = 180


@pytest.fixture(scope="module")
def duo_and_solo(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("multidevice")
    common = ["--peers", "2", "--steps", str(STEPS), "--batch-size", str(BATCH)]
    settings = dict(target_batch_size=TARGET, averaging_timeout=20, matchmaking_time=2)
    ckpt = workdir / "duo.ckpt"
    duo_args = [*common, "--devices", "2", "--data-seed", "1", "--ckpt-out", str(ckpt)]
    duo_args += ["--fail-round-at-step", str(FAILED_ON_DUO), "--resume-steps", str(STEPS + 1)]
    duo_args += ["--resume-precision", "bf16-mixed"]
    solo_args = [*common, "--devices", "1", "--data-seed", "2", "--wait-for-peers-at-step", str(FAILED_ON_DUO + 1)]
    duo_env = {"COLLAB_CLIENT_MODE": "1", "COLLAB_REUSE_GRAD_BUFFERS": "1"}
    with bootstrap_dht() as dht, PeerSet(workdir, collab_env(dht, "multidevice", **settings)) as peers:
        duo = peers.start("duo", duo_args, duo_env, script=PEER)
        solo = peers.start("solo", solo_args, script=PEER)
        peers.wait([duo, solo], timeout=TIMEOUT)  # duo's rank 0 exits once both its processes saved
        duo_ranks = [duo.result(), torch.load(f"{duo.out}.rank1", weights_only=False)]
        return {
            "duo": duo_ranks,
            "duo_log": duo.log_text(),
            "solo": solo.result(),
            "checkpoint": torch.load(ckpt, weights_only=False),
            "resumed": [rank["resumed"] for rank in duo_ranks],  # a second fit of duo's processes, from ckpt
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
    for step in range(FAILED_ON_DUO + 1):  # both were in these rounds (duo's failed on its side after the exchange)
        assert set(round_contributions([rank0, solo], step)) == {rank0["peer_id"], solo["peer_id"]}


@pytest.mark.slow
def test_after_its_failed_round_the_peer_downloads_and_both_processes_take_the_state(duo_and_solo):
    rank0, rank1 = duo_and_solo["duo"]
    assert failed_round_step(duo_and_solo["duo_log"]) == FAILED_ON_DUO
    state = rank0["collaboration_state"]
    assert state["failed_rounds"] >= 1 and state["state_downloads"] >= 1
    assert FAILED_ON_DUO + 1 in rank1["per_step"]  # the download's step (solo held there until duo came)
    assert sorted(rank0["per_step"]) == sorted(rank1["per_step"]) == list(range(1, STEPS + 1))


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
    for step in range(1, STEPS + 1):  # after every change of the collaborative step (updates and the download)
        assert max_diff(rank0["per_step"][step]["params"], rank1["per_step"][step]["params"]) <= 1e-6
        assert rank0["per_step"][step]["lr"] == rank1["per_step"][step]["lr"] == BASE_LR * lr_factor(step)
    assert rank0["final_lr"] == rank1["final_lr"] == solo["final_lr"]
    assert rank0["scheduler_last_epoch"] == rank1["scheduler_last_epoch"] == STEPS


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


@pytest.mark.slow
def test_ckpt_path_resumes_both_processes_at_the_collaborative_step_in_bf16(duo_and_solo):
    rank0, rank1 = duo_and_solo["resumed"]
    assert rank0["precision"] == rank1["precision"] == "bf16-mixed"
    assert rank0["step_at_start"] == rank1["step_at_start"] == STEPS
    saved = list(duo_and_solo["checkpoint"]["state_dict"].values())
    assert max_diff(rank0["params_at_start"], saved) == max_diff(rank1["params_at_start"], saved) == 0.0
    assert rank0["collaborative_step"] == rank1["collaborative_step"] == STEPS + 1
    assert max_diff(rank0["final"], rank1["final"]) <= 1e-6
    assert max_diff(rank0["final"], saved) > 1e-4, "the resumed fit did not train"
    assert rank0["final_lr"] == rank1["final_lr"] == BASE_LR * lr_factor(STEPS + 1)
    assert rank0["scheduler_last_epoch"] == rank1["scheduler_last_epoch"] == STEPS + 1
