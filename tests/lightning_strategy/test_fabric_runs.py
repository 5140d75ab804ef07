"""``Fabric(strategy="collaborative")`` with real Fabric loops: every peer is a separate OS process on loopback.

``tests/peers/fabric_peer.py`` is the peer script; a single-process replay of the recorded micro-batches checks the
numbers.
"""

from __future__ import annotations

import pytest
import torch

from tests.peers.fabric_peer import BASE_LR, make_optimizer
from tests.peers.lightning_peer import lr_factor, make_net
from tests.support.processes import REPO_ROOT, PeerSet, bootstrap_dht, collab_env
from tests.support.round_contributions import contributed_batches

FABRIC_PEER = REPO_ROOT / "tests" / "peers" / "fabric_peer.py"
TIMEOUT = 180
STEPS = 4


def run_fabric_peers(workdir, run_id, specs, **settings):
    """Run peers ``(name, args, env)`` to completion against a fresh bootstrap DHT; return ``{name: result}``."""
    with bootstrap_dht() as dht, PeerSet(workdir, collab_env(dht, run_id, **settings)) as peers:
        started = [peers.start(name, args, env, script=FABRIC_PEER) for name, args, env in specs]
        peers.wait(started, timeout=TIMEOUT)
        return {peer.name: {**peer.result(), "log": peer.log_text()} for peer in started}


def replay(results: dict, steps: int, bf16: frozenset[str] = frozenset()) -> torch.nn.Module:
    """One process, one large batch per collaborative step: the sample-weighted mean of the micro-batches' gradients
    (each a mean loss's, computed under bf16 autocast for the peers named in ``bf16``), one SGD step, one scheduler
    step."""
    net = make_net()
    opt, scheduler = make_optimizer(net)
    for step in range(steps):
        sums = [torch.zeros_like(p) for p in net.parameters()]
        total = 0
        for name, sent in contributed_batches(results, step, "batches").items():
            for x, y in sent:
                net.zero_grad()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name in bf16):
                    loss = torch.nn.functional.cross_entropy(net(x), y)
                loss.backward()
                for acc, p in zip(sums, net.parameters(), strict=True):
                    acc.add_(p.grad, alpha=len(x))
                total += len(x)
        for acc, p in zip(sums, net.parameters(), strict=True):
            p.grad = acc / total
        opt.step()
        scheduler.step()
    return net


def max_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def two_peers(tmp_path_factory):
    """Two Fabric peers: p0 reports ``step(batch_size=8)`` and saves a checkpoint, p1 calls ``step()`` with
    ``COLLAB_BATCH_SIZE=12``; meanwhile, a bf16 peer trains alone in a run of its own (on the same bootstrap node)."""
    workdir = tmp_path_factory.mktemp("fabric")
    common = ["--peers", "2", "--steps", str(STEPS)]
    specs = [
        ("p0", [*common, "--batch-size", "8", "--data-seed", "1", "--ckpt-out", str(workdir / "p0.ckpt")], {}),
        ("p1", [*common, "--batch-size", "12", "--data-seed", "2", "--batch-size-from-setting"],
         {"COLLAB_BATCH_SIZE": "12"}),
        ("solo", ["--steps", "2", "--precision", "bf16-mixed"], {"COLLAB_RUN_ID": "fabric-bf16",
                                                                  "COLLAB_TARGET_BATCH_SIZE": "32"}),
    ]  # fmt: skip
    return run_fabric_peers(workdir, "fabric", specs, target_batch_size=48, averaging_timeout=20, matchmaking_time=3)


@pytest.mark.slow
def test_two_fabric_peers_average_and_end_with_identical_weights(two_peers):
    p0, p1 = two_peers["p0"], two_peers["p1"]
    assert p0["num_peers"] == p1["num_peers"] == 2  # the bf16 peer's run is another collaboration
    assert p0["collaborative_step"] == p1["collaborative_step"] == STEPS
    assert p0["optimizer_class"] == "CollaborativeOptimizer"
    assert max_diff(p0["final"], p1["final"]) <= 1e-6
    both = {p0["peer_id"], p1["peer_id"]}
    assert any(set(record) == both for record in p0["contributions"].values()), "no round averaged both peers"


@pytest.mark.slow
def test_fabric_peers_match_single_process_replay(two_peers):
    # p1 never passes batch_size: had the setting not reached its steps, it could not have stepped at all; had the
    # samples been counted wrongly, the weights of the mean gradient (and so the replay) would differ
    pair = {name: two_peers[name] for name in ("p0", "p1")}
    reference = replay(pair, STEPS)
    for result in pair.values():
        assert max_diff(result["final"], list(reference.parameters())) <= 1e-5


@pytest.mark.slow
def test_fabric_scheduler_advances_once_per_collaborative_step_despite_the_loops_calls(two_peers):
    for result in (two_peers["p0"], two_peers["p1"]):
        assert result["scheduler_last_epoch"] == STEPS  # the loop called scheduler.step() at every micro-batch
        assert result["final_lr"] == pytest.approx(BASE_LR * lr_factor(STEPS))
        for step, lr in result["lrs_used"].items():
            assert lr == pytest.approx(BASE_LR * lr_factor(step))
    # said once, at setup (p0 sets up a second Fabric to load its checkpoint, which says it again)
    assert two_peers["p1"]["log"].count("is stepped by the collaboration, once per collaborative step") == 1


@pytest.mark.slow
def test_fabric_save_and_load_keep_the_collaborative_step(two_peers):
    resumed = two_peers["p0"]["resumed"]
    assert resumed["step_before_load"] == 0
    assert resumed["collaborative_step"] == STEPS
    assert max_diff(resumed["params"], two_peers["p0"]["final"]) == 0
    assert resumed["lr"] == pytest.approx(BASE_LR * lr_factor(STEPS))
    assert resumed["scheduler_last_epoch"] == STEPS
    assert resumed["remainder"] == {"note": "from fabric_peer"}


@pytest.mark.slow
def test_fabric_bf16_peer_trains_in_bf16_and_matches_its_replay(two_peers):
    result = two_peers["solo"]
    assert result["output_dtypes"] == ["torch.bfloat16"] and result["param_dtypes"] == ["torch.float32"]
    assert result["collaborative_step"] == 2
    reference = replay({"solo": result}, 2, bf16=frozenset({"solo"}))
    assert max_diff(result["final"], list(reference.parameters())) <= 1e-5
