"""The core's promises, each checked with real peers: separate OS processes with their own DHT nodes on loopback.

Every run is a module-scoped fixture (several tests read the same run); the peers are started by
``tests/support/processes.py``, which ends every process group on exit, also when a test fails.
"""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch

from tests.peers.core_peer import failed_round_step, make_scheduler
from tests.support.core_runs import TIMEOUT, max_diff, peer_spec, replay_single_process, run_peers, state_diff
from tests.support.processes import PeerSet, bootstrap_dht, collab_env
from tests.support.round_contributions import contributed_batches, round_contributions

# ---------------------------------------------------------------------------------------------------- runs

STEPS = 12
TARGET = 144


@pytest.fixture(scope="module")
def three_peers(tmp_path_factory):
    """3 peers with batch sizes 32/16/24, SGD with momentum and a LambdaLR scheduler."""
    specs = [peer_spec(f"p{i}", bs, 100 + i, STEPS, "--scheduler") for i, bs in enumerate([32, 16, 24])]
    return run_peers(
        tmp_path_factory.mktemp("three"),
        "three",
        specs,
        target_batch_size=TARGET,
        averaging_timeout=20,
        matchmaking_time=3,
    )


def test_solo_peer_updates_exactly_when_target_reached(tmp_path):
    """Alone with target 256 and 32 samples per call, the parameters change on calls 8, 16, 24 and no others."""
    specs = [peer_spec("solo", 32, 1, 3, "--compute-seconds", "0", peers=1)]
    result = run_peers(tmp_path, "solo", specs, target_batch_size=256)["solo"]
    assert result["changes_at_call"] == [8, 16, 24]
    assert result["local_step"] == 3


def test_every_step_has_target_samples_from_several_peers(three_peers):
    peers_per_step = Counter()
    for step in range(STEPS):
        peers = contributed_batches(three_peers, step, "micro_batches")
        samples = sum(len(x) for sent in peers.values() for x, _ in sent)
        assert samples >= TARGET, (step, samples)
        peers_per_step[step] = len(peers)
    # the promise being tested is the averaging: most steps must really combine all three peers
    assert sum(count == 3 for count in peers_per_step.values()) >= STEPS // 3, peers_per_step


def test_update_equals_single_process_large_batch(three_peers):
    model, _ = replay_single_process(three_peers, "sgd", STEPS, scheduler=True)
    for result in three_peers.values():
        diff = max_diff(result["final"]["params"], list(model.parameters()))
        print(f"{result['name']}: max |peer - single-process replay| = {diff:.3e}")
        assert diff <= 1e-5


def test_peer_whose_round_failed_on_its_side_downloads_and_the_update_stays_exact(tmp_path):
    """Step 2's all-reduce fails on p1 only, after every part was exchanged: p0 applies it, p1 does not.

    (If p1 missed the round of step 2, its next round fails instead.) p1 must re-synchronise by downloading p0's
    state (not by averaging its gradients of that step again), and every update, that one included, must equal the
    single-process replay of exactly the samples each round averaged. The micro-batches p1 computed at that step
    after its round were in no round (``round_contributions`` tells them apart).
    """
    steps = 5
    specs = [
        peer_spec("p0", 32, 200, steps, peers=2),
        peer_spec("p1", 16, 201, steps, "--fail-round-at-step", "2", peers=2),
    ]
    results = run_peers(
        tmp_path, "failed_on_one", specs, target_batch_size=96, averaging_timeout=20, matchmaking_time=3
    )
    failed = failed_round_step(results["p1"]["log"])  # 2, or p1's next round if it missed that one
    failing = results["p1"]["collaboration_state"]
    assert failing["failed_rounds"] >= 1 and failing["state_downloads"] >= 1, failing
    assert failed not in results["p1"]["participants"], "p1 left the failed step by a download, not by a round"
    averaged = round_contributions(results.values(), failed)
    assert set(averaged) == {r["peer_id"] for r in results.values()}, f"step {failed} averaged both peers"
    recorded = sum(len(x) for k, x, _ in results["p1"]["micro_batches"] if k == failed)
    after_round = recorded - averaged[results["p1"]["peer_id"]]
    print(f"p1 computed {after_round} samples at step {failed} after its failed round (in no round)")
    model, _ = replay_single_process(results, "sgd", steps, scheduler=False)
    for result in results.values():
        assert result["local_step"] == steps
        assert max_diff(result["final"]["params"], list(model.parameters())) <= 1e-5


def test_replicas_identical_after_every_step(three_peers):
    worst = 0.0
    for a, b in itertools.combinations(three_peers.values(), 2):
        common = set(a["per_step"]) & set(b["per_step"])
        assert len(common) >= STEPS // 2
        for step in common:
            worst = max(worst, max_diff(a["per_step"][step]["params"], b["per_step"][step]["params"]))
            worst = max(worst, state_diff(a["per_step"][step]["state"], b["per_step"][step]["state"]))
    print(f"max difference between replicas (params and momentum, all steps) = {worst:.3e}")
    assert worst <= 1e-6
    assert all("0.momentum_buffer" in r["final"]["state"] for r in three_peers.values())


def _plain_loop_learning_rates(steps: int) -> list[float]:
    """The learning rate of each update of a plain ``opt.step(); scheduler.step()`` loop (plus the one after)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = make_scheduler(opt)
    rates = []
    for _ in range(steps):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return [*rates, opt.param_groups[0]["lr"]]


def test_scheduler_learning_rate_matches_plain_loop(three_peers):
    expected = _plain_loop_learning_rates(STEPS)
    for result in three_peers.values():
        assert len(result["lrs_used"]) >= STEPS // 2
        for step, lr in result["lrs_used"].items():
            assert lr == pytest.approx(expected[step], rel=1e-12), step
        assert result["final_lr"] == pytest.approx(expected[STEPS], rel=1e-12)
        assert result["state_dict"]["local_step"] == STEPS
        assert result["state_dict"]["scheduler"]["last_epoch"] == STEPS


# ---------------------------------------------------------------------------------------------------- late joiner


@pytest.fixture(scope="module")
def late_join(tmp_path_factory):
    """2 peers train; a third starts once they are at step 3 and must download the state (step_tolerance 1)."""
    steps = 10
    specs = [
        peer_spec("a", 32, 1, steps, "--scheduler", "--finish-peers", "3", peers=2),
        peer_spec("b", 16, 2, steps, "--scheduler", "--finish-peers", "3", peers=2),
        peer_spec("late", 24, 3, steps, "--scheduler", "--join-at-step", "3", "--finish-peers", "3", peers=2),
    ]
    return run_peers(
        tmp_path_factory.mktemp("late"),
        "late",
        specs,
        target_batch_size=96,
        averaging_timeout=20,
        matchmaking_time=3,
        step_tolerance=1,
    )


def test_late_joiner_downloads_state_and_stays_identical(late_join):
    late, a, b = late_join["late"], late_join["a"], late_join["b"]
    assert late["collaboration_state"]["state_downloads"] >= 1
    print(f"late joiner downloads: {late['collaboration_state']['state_downloads']}")
    joined_steps = sorted(late["per_step"])
    first = joined_steps[0]
    assert first >= 3
    worst = 0.0
    for step in joined_steps:
        for other in (a, b):
            if step not in other["per_step"]:
                continue  # that peer reached this step by a download too
            worst = max(worst, max_diff(late["per_step"][step]["params"], other["per_step"][step]["params"]))
            worst = max(worst, state_diff(late["per_step"][step]["state"], other["per_step"][step]["state"]))
    print(f"late joiner vs others after download (params and momentum) = {worst:.3e}")
    assert worst <= 1e-6
    # after the download the late peer contributes to later steps
    assert any(step >= first for step, _, _ in late["micro_batches"])


def test_late_joiner_scheduler_and_step_counter(late_join):
    late, a = late_join["late"], late_join["a"]
    assert late["local_step"] == a["local_step"] == 10
    assert late["final_lr"] == pytest.approx(a["final_lr"], rel=1e-12)
    expected = _plain_loop_learning_rates(10)
    assert late["lrs_used"]  # it took steps itself after joining
    for step, lr in late["lrs_used"].items():
        assert lr == pytest.approx(expected[step], rel=1e-12), step
    assert late["state_dict"]["scheduler"]["last_epoch"] == a["state_dict"]["scheduler"]["last_epoch"] == 10


# ---------------------------------------------------------------------------------------------------- modes


def test_client_mode_peer_without_listen_address_contributes(tmp_path):
    steps = 10
    client_env = {"COLLAB_CLIENT_MODE": "1", "COLLAB_HOST_MADDRS": ""}
    specs = [
        peer_spec("server", 32, 1, steps, peers=2),
        peer_spec("client", 16, 2, steps, peers=2, env=client_env),
    ]
    results = run_peers(tmp_path, "client", specs, target_batch_size=96, averaging_timeout=20, matchmaking_time=3)
    server, client = results["server"], results["client"]
    assert client["visible_maddrs"] == []  # nobody can connect to it
    assert server["visible_maddrs"]
    assert client["collaboration_state"]["num_clients"] == 1
    client_steps = [step for step in range(steps) if client["peer_id"] in server["participants"].get(step, ())]
    # the client's gradients reached the server's updates (its first steps may go to catching up with the server)
    assert len(client_steps) >= 3, client_steps
    assert max_diff(server["final"]["params"], client["final"]["params"]) <= 1e-6
    model, _ = replay_single_process(results, "sgd", steps, scheduler=False)
    assert max_diff(client["final"]["params"], list(model.parameters())) <= 1e-5


def test_reuse_grad_buffers_and_cpu_accumulation_match_large_batch(tmp_path):
    steps = 6
    specs = [
        peer_spec("reuse", 32, 1, steps, peers=2, env={"COLLAB_REUSE_GRAD_BUFFERS": "1"}),
        peer_spec("offload", 16, 2, steps, peers=2, env={"COLLAB_ACCUMULATE_GRADS_ON": "cpu"}),
    ]
    results = run_peers(tmp_path, "modes", specs, target_batch_size=96, averaging_timeout=20, matchmaking_time=3)
    model, _ = replay_single_process(results, "sgd", steps, scheduler=False)
    for result in results.values():
        assert max_diff(result["final"]["params"], list(model.parameters())) <= 1e-5
    assert max_diff(results["reuse"]["final"]["params"], results["offload"]["final"]["params"]) <= 1e-6


def test_adaptive_optimizer_averages_params_and_named_statistics(tmp_path):
    steps = 8
    specs = [
        peer_spec(f"p{i}", bs, 10 + i, steps, "--optimizer", "adam", "--adaptive", "exp_avg_sq", peers=3)
        for i, bs in enumerate([32, 16, 24])
    ]
    results = run_peers(tmp_path, "adaptive", specs, target_batch_size=144, averaging_timeout=20, matchmaking_time=3)
    worst_params = worst_stats = 0.0
    differing_exp_avg = 0.0
    for a, b in itertools.combinations(results.values(), 2):
        for step in set(a["per_step"]) & set(b["per_step"]):
            sa, sb = a["per_step"][step], b["per_step"][step]
            worst_params = max(worst_params, max_diff(sa["params"], sb["params"]))
            for key in sa["state"]:
                diff = (sa["state"][key] - sb["state"][key]).abs().max().item()
                if key.endswith("exp_avg_sq"):
                    worst_stats = max(worst_stats, diff)
                elif key.endswith("exp_avg"):
                    differing_exp_avg = max(differing_exp_avg, diff)
    print(
        f"adaptive: params {worst_params:.3e}, exp_avg_sq {worst_stats:.3e}, exp_avg (not averaged) "
        f"{differing_exp_avg:.3e}"
    )
    assert worst_params <= 1e-6
    assert worst_stats <= 1e-6
    assert differing_exp_avg > 1e-6  # exp_avg is not named, so it stays local: the averaging really is selective
    assert any(r["collaboration_state"]["last_round_peers"] == 3 for r in results.values())


# ---------------------------------------------------------------------------------------------------- failures


def test_peer_dying_mid_allreduce_does_not_stall_or_split_survivors(tmp_path):
    steps, averaging_timeout, matchmaking_time = 7, 4, 2
    specs = [
        peer_spec("a", 32, 1, steps, "--finish-peers", "2"),
        peer_spec("b", 16, 2, steps, "--finish-peers", "2"),
        peer_spec("victim", 24, 3, steps, "--die-at-step", "3"),
    ]
    with bootstrap_dht() as dht:
        env = collab_env(
            dht, "dying", target_batch_size=144, averaging_timeout=averaging_timeout, matchmaking_time=matchmaking_time
        )
        with PeerSet(tmp_path, env) as peers:
            a, b, victim = (peers.start(name, args, penv) for name, args, penv in specs)
            peers.wait([a, b], timeout=TIMEOUT)
            assert victim.process.wait(30) == -9  # it really was SIGKILLed during the all-reduce
            results = {"a": a.result(), "b": b.result()}
    for result in results.values():
        assert result["local_step"] == steps
        state = result["collaboration_state"]
        # the lost round is reported, not hidden (a survivor that was not in that group downloads instead)
        assert state["failed_rounds"] >= 1 or state["state_downloads"] >= 1
    assert any(r["collaboration_state"]["failed_rounds"] >= 1 for r in results.values())
    worst = max(
        max_diff(results["a"]["per_step"][k]["params"], results["b"]["per_step"][k]["params"])
        for k in set(results["a"]["per_step"]) & set(results["b"]["per_step"])
    )
    assert worst <= 1e-6
    times = results["a"]["step_times"]
    longest_gap = max(times[k + 1] - times[k] for k in range(1, steps))
    print(f"survivors identical within {worst:.3e}; longest time between steps {longest_gap:.2f}s")
    # the stall is bounded by the timeouts (plus one matchmaking window for the retry and process noise)
    assert longest_gap <= averaging_timeout + 2 * matchmaking_time + 10


@pytest.mark.parametrize("tolerance, calls_before_download", [(0, 1), (5, 3)])
def test_step_tolerance_decides_when_a_lagging_peer_downloads(tmp_path, tolerance, calls_before_download):
    """Peer ``ahead`` trains 2 steps alone; ``lagging`` starts 2 steps behind (target 96, 32 per call).

    With step_tolerance 0 it is out of sync and downloads on its first step(); with step_tolerance 5 it is deemed
    synchronized and keeps accumulating, and downloads only when its own step comes (3rd call) and it sees that the
    collaboration already took it: it never averages with, or steps apart from, peers at another step.
    """
    common = ["--compute-seconds", "0", "--finish-peers", "2"]
    specs = [
        peer_spec("ahead", 32, 1, 2, *common, peers=1),
        peer_spec(
            "lagging", 32, 2, 2, *common, "--join-at-step", "2", peers=1, env={"COLLAB_STEP_TOLERANCE": str(tolerance)}
        ),
    ]
    results = run_peers(
        tmp_path, f"tolerance{tolerance}", specs, target_batch_size=96, averaging_timeout=20, matchmaking_time=3
    )
    ahead, lagging = results["ahead"], results["lagging"]
    assert lagging["calls"] == calls_before_download
    assert lagging["collaboration_state"]["state_downloads"] == 1
    assert lagging["collaboration_state"]["failed_rounds"] == 0
    assert max_diff(lagging["final"]["params"], ahead["final"]["params"]) == 0.0  # a download copies exactly
    assert state_diff(lagging["final"]["state"], ahead["final"]["state"]) == 0.0
