"""``Trainer(strategy="collaborative")`` with real Trainers: every peer is a separate OS process on loopback.

Each module-scoped fixture is one run whose records several tests read; ``tests/peers/lightning_peer.py`` is the
peer script (it records batches, collaborative steps, learning rates, metrics and process/thread state).
"""

from __future__ import annotations

import csv
import json
import time

import pytest
import torch

from collab_core.metrics import METRIC_DESCRIPTIONS, PROGRESS_BAR_METRICS
from tests.peers.core_peer import failed_round_step
from tests.peers.lightning_peer import lr_factor, make_net
from tests.support.lightning_replay import BASE_LR, max_diff, replay
from tests.support.processes import REPO_ROOT, PeerSet, bootstrap_dht, collab_env
from tests.support.round_contributions import contributed_batches, round_contributions

LIGHTNING_PEER = REPO_ROOT / "tests" / "peers" / "lightning_peer.py"
TIMEOUT = 240


def run_lightning_peers(workdir, run_id, specs, timeout=TIMEOUT, **settings):
    """Run peers ``(name, args, env)`` to completion against a fresh bootstrap DHT; return ``{name: result}``."""
    with bootstrap_dht() as dht, PeerSet(workdir, collab_env(dht, run_id, **settings)) as peers:
        started = [peers.start(name, args, env, script=LIGHTNING_PEER) for name, args, env in specs]
        peers.wait(started, timeout=timeout)
        results = {peer.name: peer.result() for peer in started}
        for peer in started:
            results[peer.name]["log"] = peer.log_text()
        return results


# ------------------------------------------------------------------------------------------------ lockstep run

STEPS = 6
FAILED_ON_P1 = 3


@pytest.fixture(scope="module")
def lockstep(tmp_path_factory):
    """3 Trainers configured only by COLLAB_* variables; batch sizes 16 (x2 accumulation), 8 and 12; one client.

    The all-reduce of step ``FAILED_ON_P1`` fails on p1 only, after the exchange (the others apply it).
    """
    workdir = tmp_path_factory.mktemp("lockstep")
    common = ["--peers", "3", "--steps", str(STEPS), "--scheduler", "step"]
    specs = [
        ("p0", [*common, "--batch-size", "16", "--accumulate", "2", "--data-seed", "1", "--csv-dir", str(workdir)], {}),
        ("p1", [*common, "--batch-size", "8", "--data-seed", "2", "--fail-round-at-step", str(FAILED_ON_P1)], {}),
        ("p2", [*common, "--batch-size", "12", "--data-seed", "3"], {"COLLAB_CLIENT_MODE": "1"}),
    ]
    results = run_lightning_peers(
        workdir, "lockstep", specs, target_batch_size=96, averaging_timeout=20, matchmaking_time=3
    )
    results["p0"]["csv"] = list(csv.DictReader(open(next(workdir.glob("run/version_*/metrics.csv")))))
    return results


@pytest.mark.slow
def test_environment_settings_reach_the_dht_and_peers_find_each_other(lockstep):
    for result in lockstep.values():
        assert result["num_peers_seen"] == 3
    all_ids = {r["peer_id"] for r in lockstep.values()}
    assert any(ids == all_ids for ids in lockstep["p0"]["participants"].values()), "no step averaged all 3 peers"


@pytest.mark.slow
def test_peers_end_in_lockstep_with_identical_weights(lockstep):
    results = list(lockstep.values())
    assert {r["collaborative_step"] for r in results} == {STEPS}
    for other in results[1:]:
        assert max_diff(results[0]["final"], other["final"]) <= 1e-6


@pytest.mark.slow
def test_reported_samples_match_single_process_replay(lockstep):
    # p0 accumulates 2 batches per optimizer step: had it reported one batch's samples, its gradients would carry half
    # the weight they should and the result would differ from the replay.
    reference = replay(lockstep, STEPS)
    for result in lockstep.values():
        assert max_diff(result["final"], list(reference.parameters())) <= 1e-5
    samples = [len(x) for sent in contributed_batches(lockstep, 0, "batches").values() for x, _y in sent]
    assert sum(samples) >= 96


@pytest.mark.slow
def test_peer_whose_round_failed_on_its_side_downloads_and_its_later_batches_count_nowhere(lockstep):
    p1 = lockstep["p1"]
    failed = failed_round_step(p1["log"])  # FAILED_ON_P1, or its next round if it missed that one
    # (under load it may miss a later round as well and download again: only the first download is this test's)
    assert p1["collaboration_state"]["failed_rounds"] >= 1 and p1["collaboration_state"]["state_downloads"] >= 1
    # it left the failed step by a download (to the next step, or a later one if the others had moved on meanwhile)
    left_failed_step = min(step for step in p1["per_step"] if step > failed)
    assert p1["per_step"][left_failed_step]["downloaded"]
    averaged = round_contributions(lockstep.values(), failed)
    assert p1["peer_id"] in averaged, "the others applied the round with p1's samples in it"
    # the batch whose step() found the others ahead (and downloaded) was computed at the failed step, in no round
    recorded = sum(len(x) for k, x, _y in p1["batches"] if k == failed)
    assert recorded > averaged[p1["peer_id"]]


@pytest.mark.slow
def test_step_interval_scheduler_advances_once_per_collaborative_step(lockstep):
    for result in lockstep.values():
        assert result["scheduler_last_epoch"] == STEPS
        assert result["final_lr"] == pytest.approx(BASE_LR * lr_factor(STEPS))
        for step, lr in result["lrs_used"].items():
            assert lr == pytest.approx(BASE_LR * lr_factor(step))


@pytest.mark.slow
def test_client_mode_from_environment_listens_nowhere_and_contributes(lockstep):
    client = lockstep["p2"]
    assert client["client_mode"] is True
    assert "client mode" in client["join_hint"]
    assert client["visible_maddrs"] == []
    assert any(client["peer_id"] in ids for ids in lockstep["p0"]["participants"].values())
    assert lockstep["p0"]["visible_maddrs"], "a non-client peer listens on loopback"


@pytest.mark.slow
def test_metrics_reach_progress_bar_and_csv_logger(lockstep):
    p0 = lockstep["p0"]
    assert set(PROGRESS_BAR_METRICS) <= set(p0["after_first_fit"]["progress_bar_metrics"])
    assert set(METRIC_DESCRIPTIONS) <= set(p0["after_first_fit"]["logged_metrics"])
    rows = p0["csv"]
    assert set(METRIC_DESCRIPTIONS) <= set(rows[0])
    logged_steps = [float(row["collab/step"]) for row in rows if row.get("collab/step")]
    assert logged_steps[0] == 0 and logged_steps[-1] == STEPS
    assert all(float(row["collab/target_batch_size"]) == 96 for row in rows if row.get("collab/target_batch_size"))
    assert max(float(row["collab/peers"]) for row in rows if row.get("collab/peers")) == 3


@pytest.mark.slow
def test_epoch_interval_warning_only_for_schedulers_lightning_steps_per_epoch(lockstep, checkpoint_runs):
    """Lightning steps a scheduler returned without a config dict once per epoch; a collaboration has no shared
    epoch, so the strategy says once, at setup, that it steps it per collaborative step, and what to change."""
    warning = "has interval='epoch'"
    log = checkpoint_runs["seed"]["log"]  # --scheduler epoch
    assert log.count(warning) == 1 and "'interval': 'step'" in log
    for result in lockstep.values():  # --scheduler step: interval="step"
        assert warning not in result["log"]


@pytest.mark.slow
def test_join_hint_is_printed_at_start(lockstep):
    log = lockstep["p0"]["log"]
    assert "[collaborative] run 'lockstep'" in log
    assert "COLLAB_INITIAL_PEERS=" in log and lockstep["p0"]["peer_id"] in log


# ------------------------------------------------------------------------------- checkpoint, resume, late joiner


@pytest.fixture(scope="module")
def checkpoint_runs(tmp_path_factory):
    """``lightning.pytorch`` namespace, epoch-interval scheduler: a checkpoint at step 3, then two ways to resume."""
    workdir = tmp_path_factory.mktemp("checkpoint")
    ckpt = workdir / "step3.ckpt"
    # 128 samples: an epoch (and so an epoch-interval scheduler call by Lightning) every 2 collaborative steps
    common = ["--namespace", "lightning", "--scheduler", "epoch", "--batch-size", "16", "--samples", "128"]
    runs = {}
    runs["seed"] = run_lightning_peers(
        workdir, "seed", [("seed", [*common, "--steps", "3", "--ckpt-out", str(ckpt)], {})], target_batch_size=64
    )["seed"]
    runs["resume"] = run_lightning_peers(
        workdir, "resume", [("resume", [*common, "--steps", "5", "--ckpt-in", str(ckpt)], {})], target_batch_size=64
    )["resume"]
    # "ahead" trains alone to step 5 and waits there; only then does "behind" start from the step-3 checkpoint
    ahead_args = [*common, "--finish-peers", "2", "--steps", "8", "--data-seed", "5", "--wait-for-joiner-at-step", "5"]
    behind_args = [*common, "--finish-peers", "2", "--steps", "8", "--data-seed", "6", "--ckpt-in", str(ckpt),
                   "--join-at-step", "5"]  # fmt: skip
    settings = dict(target_batch_size=64, averaging_timeout=20, matchmaking_time=3)
    with bootstrap_dht() as dht, PeerSet(workdir, collab_env(dht, "behind", **settings)) as peers:
        ahead = peers.start("ahead", ahead_args, script=LIGHTNING_PEER)
        deadline = time.monotonic() + TIMEOUT
        while "waiting for the joiner at step 5" not in ahead.log_text():
            assert ahead.process.poll() is None and time.monotonic() < deadline, peers.logs()
            time.sleep(0.1)
        behind = peers.start("behind", behind_args, script=LIGHTNING_PEER)
        peers.wait([ahead, behind], timeout=TIMEOUT)
        runs.update(ahead=ahead.result(), behind=behind.result())
    return runs


@pytest.mark.slow
def test_checkpoint_after_fit_resumes_at_its_collaborative_step(checkpoint_runs):
    resumed = checkpoint_runs["resume"]
    assert resumed["steps_seen_at_start"] == 3, "fit(ckpt_path=...) must restore the collaborative step"
    assert min(resumed["per_step"]) == 4 and resumed["collaborative_step"] == 5
    assert resumed["scheduler_last_epoch"] == 5
    assert resumed["final_lr"] == pytest.approx(BASE_LR * lr_factor(5))


@pytest.mark.slow
def test_peer_resuming_an_old_checkpoint_downloads_and_matches(checkpoint_runs):
    ahead, behind = checkpoint_runs["ahead"], checkpoint_runs["behind"]
    assert behind["steps_seen_at_start"] == 3
    assert behind["collaboration_state"]["state_downloads"] >= 1
    assert ahead["collaborative_step"] == behind["collaborative_step"] == 8
    assert max_diff(ahead["final"], behind["final"]) <= 1e-6


@pytest.mark.slow
def test_epoch_interval_scheduler_follows_collaborative_steps_after_download(checkpoint_runs):
    ahead, behind = checkpoint_runs["ahead"], checkpoint_runs["behind"]
    for result in (ahead, behind):
        assert result["scheduler_last_epoch"] == 8
        assert result["final_lr"] == pytest.approx(BASE_LR * lr_factor(8))
    for step, lr in behind["lrs_used"].items():
        assert lr == pytest.approx(BASE_LR * lr_factor(step)), f"the joiner used a wrong LR at step {step}"


# ------------------------------------------------------------------------------------ gradient-buffer reuse


@pytest.fixture(scope="module")
def reuse_runs(tmp_path_factory):
    """The same solo run with reused gradient buffers, with and without validation in the middle of accumulating."""
    workdir = tmp_path_factory.mktemp("reuse")
    strategy = json.dumps({"reuse_grad_buffers": True, "target_batch_size": 80})
    common = ["--steps", "4", "--batch-size", "16", "--strategy-args", strategy]
    # 5 batches per collaborative step; validation after batches 8 and 16 falls inside steps 2 and 4
    specs = [  # two separate solo runs (own run ids), started together
        ("with_val", [*common, "--val-check-interval", "8"], {"COLLAB_RUN_ID": "reuse_val"}),
        ("no_val", common, {"COLLAB_RUN_ID": "reuse_no_val"}),
    ]
    return run_lightning_peers(workdir, "reuse", specs)


@pytest.mark.slow
def test_in_epoch_validation_keeps_reused_gradient_buffers(reuse_runs):
    with_val, no_val = reuse_runs["with_val"], reuse_runs["no_val"]
    assert with_val["collaborative_step"] == no_val["collaborative_step"] == 4
    assert "val_loss" in with_val["after_first_fit"]["logged_metrics"], "validation did not run"
    assert max_diff(with_val["final"], no_val["final"]) == 0.0


# --------------------------------------------------------------------------------------------- precision


@pytest.fixture(scope="module")
def precision_runs(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("precision")
    specs = [  # two separate solo runs (own run ids), started together
        (precision, ["--steps", "3", "--batch-size", "16", "--precision", precision], {"COLLAB_RUN_ID": f"solo{i}"})
        for i, precision in enumerate(("32-true", "bf16-mixed"))
    ]
    runs = run_lightning_peers(workdir, "solo", specs, target_batch_size=64)
    common = ["--peers", "2", "--steps", "5", "--batch-size", "16", "--fp16-on-cpu"]
    specs = [
        ("fp16_a", [*common, "--data-seed", "7"], {}),
        ("fp16_b", [*common, "--data-seed", "8", "--overflow-at-step", "2"], {}),
    ]
    runs["16-mixed"] = run_lightning_peers(
        workdir, "fp16", specs, target_batch_size=64, averaging_timeout=20, matchmaking_time=3
    )
    return runs


@pytest.mark.slow
def test_bf16_mixed_trains_like_fp32(precision_runs):
    fp32, bf16 = precision_runs["32-true"], precision_runs["bf16-mixed"]
    assert bf16["collaborative_step"] == fp32["collaborative_step"] == 3
    assert all(torch.isfinite(p).all() for p in bf16["final"])
    assert max_diff(bf16["final"], make_net().parameters()) > 1e-3, "bf16 run did not train"
    assert max_diff(bf16["final"], fp32["final"]) < 2e-2


@pytest.mark.slow
def test_fp16_overflow_is_skipped_by_every_peer_once_per_collaborative_step(precision_runs):
    runs = precision_runs["16-mixed"]
    a, b = runs["fp16_a"], runs["fp16_b"]
    for result in (a, b):
        assert result["collaborative_step"] == 5
        assert result["collaboration_state"]["overflow_steps"] == 1
        assert max_diff(result["per_step"][2]["params"], result["per_step"][3]["params"]) == 0.0
        assert all(torch.isfinite(p).all() for p in result["final"])
        # growth_interval=3, scale 1024: steps 0-1 clean, step 2 overflows (-> 512), steps 3-4 clean. Per-micro-batch
        # updates (Lightning's default, 4 micro-batches per step) would have grown the scale several times.
        assert result["scale"] == 512.0
    assert max_diff(a["final"], b["final"]) <= 1e-6


# --------------------------------------------------------------------------------------------- lifecycle


@pytest.fixture(scope="module")
def lifecycle_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lifecycle")
    args = ["--steps", "3", "--batch-size", "8", "--accumulate", "2", "--fit-twice", "--second-fit-steps", "6",
            "--scheduler", "step", "--evaluate", "--csv-dir", str(workdir)]  # fmt: skip
    result = run_lightning_peers(workdir, "lifecycle", [("solo", args, {})], target_batch_size=64)["solo"]
    result["csv"] = list(csv.DictReader(open(next(workdir.glob("run/version_*/metrics.csv")))))
    return result


@pytest.mark.slow
def test_each_optimizer_step_reports_batch_times_accumulation(lifecycle_run):
    # batch 8 x accumulate_grad_batches 2: every optimizer step adds 16 samples; the 4th reaches the target (64)
    rows = [row for row in lifecycle_run["csv"] if row.get("collab/samples_accumulated")]
    samples = [float(row["collab/samples_accumulated"]) for row in rows[:8]]
    steps = [float(row["collab/step"]) for row in rows[:8]]
    assert samples == [16, 32, 48, 0, 16, 32, 48, 0]
    assert steps == [0, 0, 0, 1, 1, 1, 1, 2]


@pytest.mark.slow
def test_constructing_the_strategy_starts_nothing(lifecycle_run):
    assert lifecycle_run["constructed_without_side_effects"]


@pytest.mark.slow
def test_teardown_ends_every_hivemind_process_and_thread(lifecycle_run):
    hivemind_children = set(lifecycle_run["children_during_fit"]) - {"torch_shm_manager"}
    assert hivemind_children, "expected the DHT/averager processes while fitting"
    for phase in (lifecycle_run["after_first_fit"], lifecycle_run["second_fit"]):
        assert set(phase["children"]) <= {"torch_shm_manager"}
    # the tracker's threads end (and its executor's: see CollaborationTracker.run); what remains are process-wide
    # singletons started once: hivemind's MPFuture backend thread and multiprocessing's resource sharer
    singletons = ("hivemind.utils.mpfuture.BACKEND", "(_serve)", "[hivemind process-wide executor]")
    for phase in (lifecycle_run["after_first_fit"], lifecycle_run["second_fit"]):
        assert [name for name in phase["threads"] if not name.endswith(singletons)] == []


@pytest.mark.slow
def test_one_trainer_fits_twice_then_validates_tests_and_predicts(lifecycle_run):
    assert lifecycle_run["after_first_fit"]["collaborative_step"] == 3
    assert lifecycle_run["second_fit"]["collaborative_step"] == 6
    evaluation = lifecycle_run["evaluation"]
    assert "val_loss" in evaluation["validate"][0] and "test_loss" in evaluation["test"][0]
    assert len(evaluation["predict"]) == 64


@pytest.mark.slow
def test_a_second_fit_continues_from_the_collaborative_step_the_first_reached(lifecycle_run):
    """Issue 11: the second ``fit`` of a Trainer went back to collaborative step 0 (and a fresh scheduler)."""
    second = lifecycle_run["second_fit"]
    assert second["steps_seen_at_start"] == 3
    assert second["first_step_reached"] == 4  # its first update is the collaboration's 4th
    assert second["scheduler_last_epoch"] == 6
    assert lifecycle_run["final_lr"] == pytest.approx(BASE_LR * lr_factor(6), rel=1e-12)


# ----------------------------------------------------------------------------------------- manual optimization


@pytest.mark.slow
def test_manual_optimization_documented_pattern_trains_and_double_step_is_refused(tmp_path):
    ok = ["--manual", "--steps", "2", "--batch-size", "16"]
    with bootstrap_dht() as dht, PeerSet(tmp_path, collab_env(dht, "manual", target_batch_size=64)) as peers:
        good = peers.start("manual_ok", ok, {"COLLAB_RUN_ID": "manual_ok"}, script=LIGHTNING_PEER)
        bad = peers.start("manual_double", [*ok, "--manual-double-step"], {"COLLAB_RUN_ID": "bad"}, LIGHTNING_PEER)
        peers.wait([good])
        assert bad.process.wait(TIMEOUT) != 0
        assert good.result()["collaborative_step"] == 2
        assert "at most once per training batch" in bad.log_text()
