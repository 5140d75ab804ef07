"""The monitor's pure pieces on fabricated records: parsing, the swarm's state, Prometheus text, the status table,
history, backup scheduling and pruning, reachability advice and the doctor's findings."""

from __future__ import annotations

import math

import pytest
import torch

from collab_core.backup import (
    BACKUP_FILE,
    backup_due,
    is_backup,
    make_backup,
    newest_backup,
    prune_backups,
    write_backup,
)
from collab_core.doctor import (
    address_findings,
    clock_findings,
    format_findings,
    initial_peer_findings,
    version_findings,
)
from collab_core.metrics_publisher import loss_value
from collab_core.monitor.history import History
from collab_core.monitor.prometheus import render_prometheus
from collab_core.monitor.swarm import build_state, parse_progress_records
from collab_core.monitor.table import NO_PEERS, render_table
from collab_core.peer_metrics import parse_metrics_records
from collab_core.reachability import address_kind, reachability_advice

NOW = 1_000_000.0
A, B, C = b"\x00\x24" + b"a" * 36, b"\x00\x24" + b"b" * 36, b"\x00\x24" + b"c" * 36


def metrics(peer_id=A, **changes):
    record = dict(peer_id=peer_id, step=3, loss=0.5, samples_per_second=10.0, samples_contributed=100,
                  target_batch_size=64, client_mode=False, time=NOW - 1, version="0.1.0",
                  maddrs=["/ip4/127.0.0.1/tcp/1234/p2p/x"])  # fmt: skip
    record.update(changes)
    return record


def progress(peer_id=A, **changes):
    record = dict(peer_id=peer_id, epoch=3, samples_accumulated=16, samples_per_second=9.0, time=NOW - 1,
                  client_mode=False)  # fmt: skip
    record.update(changes)
    return record


def state_of(progress_records, metrics_records, **kwargs):
    parsed_progress, skipped_p = parse_progress_records(dict(enumerate(progress_records)), NOW)
    parsed_metrics, skipped_m = parse_metrics_records(dict(enumerate(metrics_records)), NOW)
    skipped = kwargs.pop("skipped_records", len(skipped_p + skipped_m))
    return build_state("run", parsed_progress, parsed_metrics, NOW, skipped_records=skipped, **kwargs)


@pytest.mark.parametrize(
    "bad",
    [
        metrics(loss=math.nan),
        metrics(samples_per_second=math.inf),
        metrics(samples_per_second=-1.0),
        metrics(time=NOW + 3600),
        metrics(step="3"),
        metrics(samples_contributed=-5),
        metrics(maddrs=["x"] * 100),
        metrics(peer_id=b"x" * 1000),
        "not a record",
        [1, 2, 3],
    ],
)
def test_malformed_metrics_records_are_skipped(bad):
    records, skipped = parse_metrics_records({"good": metrics(), "bad": bad}, NOW)
    assert list(records) == [A] and len(skipped) == 1


def test_withdrawn_and_missing_records():
    assert parse_metrics_records({"gone": None}, NOW) == ({}, [])
    assert parse_metrics_records(None, NOW) == ({}, [])
    assert parse_progress_records("garbage", NOW)[1] == ["not a dictionary (str)"]


def test_state_merges_progress_and_metrics():
    state = state_of(
        [progress(A), progress(B, samples_accumulated=24), progress(C, epoch=2, client_mode=True)],
        [metrics(A, samples_per_second=20.0), metrics(B, loss=1.5, samples_per_second=12.0)],
    )
    assert state.num_peers == 3 and state.num_clients == 1
    assert state.step == 3 and state.samples_accumulated == 40 and state.target_batch_size == 64
    assert state.samples_per_second == pytest.approx(20 + 12 + 9)  # C has no metrics record: its progress rate
    assert state.eta_seconds == pytest.approx(24 / 41)
    assert state.loss == pytest.approx(1.0)
    client = next(p for p in state.peers if p.client_mode)
    assert client.reached_at.startswith("client mode") and client.samples_contributed is None
    assert all(p.last_seen == pytest.approx(1.0) for p in state.peers)
    assert state.to_json()["num_peers"] == 3


def test_stale_metrics_only_peers_are_dropped():
    state = state_of([], [metrics(A), metrics(B, time=NOW - 100)], expiration=30)
    assert [p.step for p in state.peers] == [3] and state.num_peers == 1


def test_no_peers_state_table_and_prometheus():
    state = state_of([], [])
    assert state.peers == () and state.eta_seconds is None and state.target_batch_size is None
    assert NO_PEERS in render_table(state)
    text = render_prometheus(state)
    assert 'collab_peers{run_id="run"} 0' in text
    assert "collab_eta_seconds{" not in text and "collab_loss{" not in text  # unknown values are left out


def test_prometheus_per_peer_series():
    state = state_of([progress(A), progress(B)], [metrics(A), metrics(B, loss=None)], skipped_records=1)
    text = render_prometheus(state)
    short = {p.short_id for p in state.peers}
    assert len(short) == 2
    for peer in short:
        assert f'collab_peer_step{{run_id="run",peer="{peer}"}} 3' in text
    assert text.count("collab_peer_loss{") == 1  # one peer publishes no loss
    assert 'collab_samples_per_second{run_id="run"} 20' in text
    assert 'collab_skipped_records{run_id="run"} 1' in text
    assert "# TYPE collab_peer_samples_contributed counter" in text


def test_table_lists_every_peer():
    state = state_of([progress(A), progress(B)], [metrics(A), metrics(B)])
    table = render_table(state)
    assert table.splitlines()[0].startswith("run 'run': step 3, 32/64 samples, 2 peer(s)")
    assert all(p.short_id in table for p in state.peers) and "0.5000" in table


def test_history_keeps_loss_by_step_and_bounded_points():
    history = History(max_points=3)
    for step in range(5):
        history.add(state_of([progress(A, epoch=step)], [metrics(A, step=step, loss=1.0 / (step + 1))]))
    data = history.to_json()
    assert len(data["seconds"]) == 3 and data["step"] == [2, 3, 4]
    assert [s for s, _ in data["loss"]] == [2, 3, 4] and data["loss"][0][1] == pytest.approx(1 / 3)


def test_loss_value():
    assert loss_value(torch.tensor(0.25)) == 0.25
    assert loss_value({"loss": torch.tensor([2.0])}) == 2.0
    assert loss_value(1) == 1.0
    for bad in (None, True, math.nan, torch.ones(3), "x", {"acc": 1.0}):
        assert loss_value(bad) is None


def test_backup_schedule():
    assert not backup_due(2, None, 3) and backup_due(3, None, 3) and backup_due(37, None, 10)
    assert not backup_due(46, 37, 10) and backup_due(47, 37, 10)
    with pytest.raises(ValueError, match="every"):
        backup_due(1, None, 0)


def test_backup_folders_and_pruning(tmp_path):
    for step in (3, 6, 9, 12):
        backup = make_backup(
            "run", {"step": step, "fingerprint": "f", "scheduler": {"last_epoch": step}}, [torch.ones(2)]
        )
        write_backup(tmp_path, backup, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-step00000009", "run-step00000012"]
    newest = newest_backup(tmp_path, "run")
    assert newest is not None and newest.name == "run-step00000012"
    assert sorted(p.name for p in newest.iterdir()) == [BACKUP_FILE, "optimizer.bin", "scheduler.bin"]
    assert is_backup(torch.load(newest / BACKUP_FILE, weights_only=False))
    assert is_backup(torch.load(newest / "optimizer.bin", weights_only=False))  # what accelerator.load_state reads
    assert torch.load(newest / "scheduler.bin") == {"last_epoch": 12}
    assert prune_backups(tmp_path, "other-run", keep=1) == []
    with pytest.raises(ValueError, match="no valid step"):
        make_backup("run", {"step": "x"}, [])


def test_reachability_advice():
    assert address_kind("/ip4/10.0.0.2/tcp/1") == "private" and address_kind("/ip4/8.8.8.8/tcp/1") == "public"
    assert address_kind("/ip4/127.0.0.1/tcp/1") == "loopback" and address_kind("/dns/x/tcp/1") == "unknown"
    public_swarm = ["/ip4/9.9.9.9/tcp/31337/p2p/x"]
    advice = reachability_advice(["/ip4/192.168.1.5/tcp/4000"], public_swarm, client_mode=False)
    assert len(advice) == 1 and "COLLAB_ANNOUNCE_MADDRS" in advice[0] and "COLLAB_CLIENT_MODE=1" in advice[0]
    assert reachability_advice(["/ip4/192.168.1.5/tcp/4000"], public_swarm, client_mode=True) == []
    assert reachability_advice(["/ip4/1.1.1.1/tcp/4000"], public_swarm, client_mode=False) == []
    assert reachability_advice(["/ip4/127.0.0.1/tcp/4000"], ["/ip4/127.0.0.1/tcp/1"], client_mode=False) == []
    assert "announces no address" in reachability_advice([], public_swarm, client_mode=False)[0]


def test_reachability_advice_for_a_private_swarm_on_another_network():
    """Behind a home router: this peer's LAN is not the swarm's network, so the swarm cannot dial it."""
    import ipaddress

    lan = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("10.213.1.0/24")]
    swarm = ["/ip4/10.213.0.1/tcp/31337/p2p/x"]
    [advice] = reachability_advice(["/ip4/10.213.1.2/tcp/4000"], swarm, client_mode=False, own_networks=lan)
    assert "cannot accept connections" in advice and "COLLAB_CLIENT_MODE=1" in advice and "10.213.1.0/24" in advice
    assert reachability_advice(["/ip4/10.213.1.2/tcp/4000"], swarm, client_mode=True, own_networks=lan) == []
    same_network = [ipaddress.ip_network("10.213.0.0/24")]
    assert reachability_advice(["/ip4/10.213.0.7/tcp/4000"], swarm, False, own_networks=same_network) == []
    assert reachability_advice(["/ip4/10.213.1.2/tcp/4000"], swarm, client_mode=False) == []  # networks unknown


def test_doctor_findings():
    [skewed] = clock_findings([NOW + 40], NOW)
    assert not skewed.ok and "40 s ahead" in skewed.detail and "NTP" in skewed.fix
    assert clock_findings([NOW - 2, NOW - 30], NOW)[0].ok
    [mismatch] = version_findings("0.1.0", ["0.2.0", "0.1.0"])
    assert not mismatch.ok and "0.2.0" in mismatch.fix
    assert version_findings("0.1.0", ["0.1.0"])[0].ok
    [unreachable] = initial_peer_findings(False, {"/ip4/1.2.3.4/tcp/5/p2p/x": "Connection refused"})
    assert not unreachable.ok and "/ip4/1.2.3.4/tcp/5/p2p/x: TCP connect: Connection refused" in unreachable.detail
    [private] = address_findings(["/ip4/10.1.1.1/tcp/3"], ["/ip4/9.9.9.9/tcp/1"], client_mode=False)
    assert not private.ok and "COLLAB_CLIENT_MODE=1" in private.fix
    report = format_findings([skewed, mismatch])
    assert report.count("[FIX]") == 2 and report.count("fix:") == 2


def test_startup_advice_is_printed_once(capsys, monkeypatch):
    from collab_core import reachability

    monkeypatch.setattr(reachability, "_advised", False)
    own, swarm = ["/ip4/192.168.1.5/tcp/4000"], ["/ip4/9.9.9.9/tcp/31337/p2p/x"]
    assert reachability.advise_once(own, swarm, client_mode=False) is not None
    assert reachability.advise_once(own, swarm, client_mode=False) is None
    printed = capsys.readouterr().out
    assert printed.count("reachability:") == 1 and "collab doctor" in printed


def test_api_json_has_no_nan():
    from collab_core.monitor.server import finite_json

    assert finite_json({"a": [math.nan, 1.0, (math.inf, "x")], "b": 2}) == {"a": [None, 1.0, [None, "x"]], "b": 2}


def test_silent_peers_do_not_count_toward_the_rate():
    state = state_of([progress(A), progress(B, time=NOW - 30)], [metrics(A), metrics(B, time=NOW - 30)])
    assert state.num_peers == 2  # still listed (its record has not expired), with how long it has been silent
    assert state.samples_per_second == pytest.approx(10.0)
    assert max(p.last_seen for p in state.peers) == pytest.approx(30.0)
    assert [p.silent for p in sorted(state.peers, key=lambda p: p.last_seen)] == [False, True]
    assert state.num_silent == 1 and "(silent)" in render_table(state)


def test_demo_screenshot_without_chromium_says_why(tmp_path, monkeypatch):
    from examples import dashboard_capture

    monkeypatch.setattr(dashboard_capture, "find_chromium", lambda: None)
    reason = dashboard_capture.capture("http://127.0.0.1:1", tmp_path / "dashboard.png")
    assert reason is not None and "chromium is not installed" in reason
    assert not (tmp_path / "dashboard.png").exists()


ADDR = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWB7662HJTHapcBdVEzVZtzPm2VZZigzuqqmWDy7wZfGqs"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["monitor", "--run-id", "r"], "--initial-peers is required"),
        (["status", "--run-id", "r"], "--initial-peers is required"),
        (["monitor", "--run-id", "r", "--initial-peers", ADDR, "--port", "70000"], "--port"),
        (["monitor", "--run-id", "r", "--initial-peers", ADDR, "--interval", "0"], "--interval"),
        (["monitor", "--run-id", "r", "--initial-peers", ADDR, "--backup-dir", "d", "--keep", "0"], "--keep"),
        (["status", "--run-id", "bad run!", "--initial-peers", ADDR], "run_id"),
        (["status", "--run-id", "r", "--initial-peers", "not-an-address"], "initial_peers"),
    ],
)
def test_bad_command_lines_name_the_setting(argv, message, capsys):
    from collab_core import cli

    assert cli.main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("collab: error: ") and message in error, error
