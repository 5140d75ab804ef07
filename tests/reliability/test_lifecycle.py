"""Leaving and coming back (issue 7, scenarios 4 and 5): SIGINT/SIGTERM, then a restart of every peer.

Phase 1: two peers train to step 4 and hold there (alive, published). One gets SIGINT (Python's default handler:
``KeyboardInterrupt``; this works only because ``CollaborativeAverager.run_in_background`` restores the handler
that hivemind sets to ``SIG_IGN``), the other SIGTERM. Each saves a checkpoint (model + ``collab.state_dict()``)
and leaves. Phase 2: both restart from their checkpoints, with new DHT identities, and train to step 8.

The Lightning (``ckpt_path``) and Accelerate (``load_state``) restarts are covered by
``tests/lightning_strategy/test_strategy_runs.py::test_checkpoint_after_fit_resumes_at_its_collaborative_step`` and
``tests/accelerate/test_accelerate_checkpoint.py::test_resumed_peer_continues_from_its_step_like_an_uninterrupted_run``.
"""

from __future__ import annotations

import signal
import time
from contextlib import contextmanager

import hivemind
import pytest
import torch
from hivemind.dht.crypto import RSASignatureValidator

from tests.peers.core_peer import make_scheduler
from tests.support.processes import LOOPBACK, PeerSet, bootstrap_dht, collab_env
from tests.support.reliability import group_ends, max_replica_diff, peer_args, start, tensor_diff, wait_for_file

pytestmark = pytest.mark.slow

HOLD_STEP, FINAL_STEP, METADATA_EXPIRATION = 4, 8, 60.0
TIMEOUT = 120


def plain_loop_learning_rates(steps: int) -> list[float]:
    """The learning rate of each update of a plain ``opt.step(); scheduler.step()`` loop."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = make_scheduler(opt)
    rates = []
    for _ in range(steps + 1):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return rates


def progress_records(probe, run_id: str) -> dict:
    """Every progress record under the run's key, read by ``probe`` (``None``: withdrawn), within 10 s."""
    found = probe.get(f"{run_id}_progress", latest=True, return_future=True).result(timeout=10)
    return {} if found is None else {subkey: entry.value for subkey, entry in found.value.items()}


@contextmanager
def probe_dht(bootstrap):
    """A DHT node that can read the peers' signed records (one without the signature validator cannot: its get()
    never returns, see docs/hivemind-behaviour.md)."""
    probe = hivemind.DHT(
        initial_peers=bootstrap.get_visible_maddrs(),
        host_maddrs=[LOOPBACK],
        record_validators=[RSASignatureValidator()],
        start=True,
    )
    try:
        yield probe
    finally:
        probe.shutdown()


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("lifecycle")
    run = {"checkpoints": {name: tmp_path / f"{name}.ckpt" for name in ("a", "b")}}
    with bootstrap_dht() as dht, probe_dht(dht) as probe:
        env = collab_env(
            dht,
            "lifecycle",
            target_batch_size=96,
            averaging_timeout=5,
            matchmaking_time=2,
            metadata_expiration=METADATA_EXPIRATION,
        )
        with PeerSet(tmp_path, env) as peers:
            first = {
                name: start(
                    peers,
                    name,
                    peer_args(
                        bs,
                        seed,
                        "--scheduler",
                        "--hold",
                        "--checkpoint",
                        str(run["checkpoints"][name]),
                        steps=HOLD_STEP,
                        peers=2,
                    ),
                )
                for name, bs, seed in (("a", 32, 1), ("b", 16, 2))
            }
            for peer in first.values():
                wait_for_file(peer.out.with_name(peer.out.name + ".held"), peers, first.values(), timeout=TIMEOUT)
            run["records_while_held"] = progress_records(probe, "lifecycle")
            sent = time.monotonic()
            first["a"].process.send_signal(signal.SIGINT)
            first["b"].process.send_signal(signal.SIGTERM)
            peers.wait(list(first.values()), timeout=30)
            run["leave_seconds"] = time.monotonic() - sent
            run["groups_gone"] = {name: group_ends(peer.process.pid) for name, peer in first.items()}
            run["records_after_leaving"] = progress_records(probe, "lifecycle")
            run["first"] = {name: peer.result() for name, peer in first.items()}
            run["first_logs"] = {name: peer.log_text() for name, peer in first.items()}

            second = [
                start(
                    peers,
                    f"{name}2",
                    peer_args(
                        bs,
                        seed + 10,
                        "--scheduler",
                        "--see-peers",  # both restored peers in view: their first step waits for the other
                        "--resume",
                        str(run["checkpoints"][name]),
                        "--finish-peers",
                        "2",
                        steps=FINAL_STEP,
                        peers=2,
                    ),
                )
                for name, bs, seed in (("a", 32, 1), ("b", 16, 2))
            ]
            restarted = time.monotonic()
            peers.wait(second, timeout=TIMEOUT)
            run["restart_seconds"] = time.monotonic() - restarted
            run["second"] = {peer.name[0]: peer.result() for peer in second}
            run["second_logs"] = "\n".join(f"----- {peer.name} -----\n{peer.log_text()}" for peer in second)
    return run


def test_sigint_and_sigterm_leave_cleanly(lifecycle):
    """Scenario 5: exit 0 with a checkpoint, no process of the peer left, its progress record withdrawn at once."""
    print(
        f"\nSIGINT/SIGTERM: both peers left within {lifecycle['leave_seconds']:.2f}s; records while held "
        f"{len(lifecycle['records_while_held'])}, live records after leaving "
        f"{sum(v is not None for v in lifecycle['records_after_leaving'].values())}"
    )
    assert lifecycle["first"]["a"]["left_by"] == "SIGINT"
    assert lifecycle["first"]["b"]["left_by"] == "SIGTERM"
    assert all(lifecycle["groups_gone"].values()), lifecycle["groups_gone"]  # DHT, averager, p2p daemons: all gone
    assert sum(value is not None for value in lifecycle["records_while_held"].values()) == 2
    # withdrawn before the peers exited: nothing stale is announced, not even until metadata_expiration
    assert lifecycle["records_after_leaving"] and all(v is None for v in lifecycle["records_after_leaving"].values())
    assert lifecycle["leave_seconds"] < 15
    for name in ("a", "b"):
        assert lifecycle["checkpoints"][name].exists()
        assert "Traceback" not in lifecycle["first_logs"][name]


def test_restart_from_checkpoints_continues_step_lr_and_parameters(lifecycle):
    """Scenario 4 (core level): the collaborative step, the learning rate and the parameters continue."""
    expected_lrs = plain_loop_learning_rates(FINAL_STEP)
    first, second = lifecycle["first"], lifecycle["second"]
    print(
        f"\nrestart: both peers back at step {[second[n]['start_step'] for n in 'ab']} and at step "
        f"{[second[n]['local_step'] for n in 'ab']} after {lifecycle['restart_seconds']:.1f}s"
    )
    for name in ("a", "b"):
        before, after = first[name], second[name]
        assert before["local_step"] == HOLD_STEP
        assert after["start_step"] == HOLD_STEP  # the restored collaborative step
        assert tensor_diff(after["restored_params"], before["final"]["params"]) == 0.0
        # both restarted peers wait for each other at their first step, but only for one matchmaking window: a peer
        # whose start-up is slower than that finds the other one step ahead and downloads (the state continues)
        assert after["collaboration_state"]["state_downloads"] <= 1, lifecycle["second_logs"]
        assert after["local_step"] == FINAL_STEP
        assert min(after["lrs_used"], default=HOLD_STEP) >= HOLD_STEP
        for step, lr in after["lrs_used"].items():
            assert lr == pytest.approx(expected_lrs[step], rel=1e-12), step
        assert after["final_lr"] == pytest.approx(expected_lrs[FINAL_STEP], rel=1e-12)
    assert any(second[name]["lrs_used"] for name in ("a", "b"))  # steps were taken, not only downloaded
    worst, compared = max_replica_diff(second.values())
    assert compared >= 1 and worst <= 1e-6
