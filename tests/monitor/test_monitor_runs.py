"""``collab monitor`` / ``status`` / ``doctor`` against a real 2-peer collaboration (separate processes, loopback),
the dashboard checked in a real headless Chromium, and a whole-swarm restart from the monitor's backup.

One collaboration serves the whole module (its peers train until stopped): the monitors start while the peers do.
``collab status``/``doctor`` run once as a subprocess (``python -m collab_core``); the other calls go through
``collab_core.cli.main`` in this process, which starts its own real DHT node the same way.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from collab_core import cli
from collab_core.backup import BACKUP_FILE, is_backup
from tests.support.monitor import MonitorProcess, get_json, get_text, headless_chromium, poll_until
from tests.support.processes import (
    PeerSet,
    bootstrap_dht,
    collab_env,
    launch_logged,
    peer_env,
    run_to_completion,
    stop_process_group,
)

RUN = "monitored"
UNKNOWN_RUN = "nobody-trains-here"
BACKUP_EVERY, KEEP = 3, 2
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "dashboard.png"


def core_peer_args(index: int, steps: int = 100_000, peers: int = 2, compute: float = 0.05) -> list[str]:
    return ["--peers", str(peers), "--steps", str(steps), "--batch-size", "8", "--data-seed", str(index),
            "--compute-seconds", str(compute)]  # fmt: skip


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    """A bootstrap node, two core peers training until stopped, a monitor of their run (with backups) and a
    monitor of a run nobody trains."""
    workdir = tmp_path_factory.mktemp("monitored")
    backups = workdir / "backups"
    with bootstrap_dht() as dht:
        initial = [str(addr) for addr in dht.get_visible_maddrs()]
        env = collab_env(dht, RUN, target_batch_size=64, matchmaking_time=3, averaging_timeout=10)
        with PeerSet(workdir, env) as peers:
            started = [peers.start(f"peer{index}", core_peer_args(index)) for index in range(2)]
            extra = ["--backup-dir", str(backups), "--backup-every", str(BACKUP_EVERY), "--keep", str(KEEP)]
            monitors = [
                MonitorProcess(workdir / "monitor.log", RUN, initial, *extra),
                MonitorProcess(workdir / "unknown-monitor.log", UNKNOWN_RUN, initial),
            ]
            try:
                url, unknown_url = (monitor.url() for monitor in monitors)
                yield {
                    "url": url,
                    "unknown_url": unknown_url,
                    "initial": initial,
                    "workdir": workdir,
                    "backups": backups,
                    "peers": peers,
                    "started": started,
                    "dht": dht,
                    "env": env,
                }
            finally:
                for monitor in monitors:
                    monitor.stop()


def training_state(url: str) -> dict | None:
    """/api/state once both peers train and published a loss and a speed. (A peer's first records may say 0
    samples/s: its speed is unknown until its counts span a second, and a record is up to an interval old.)"""
    state = get_json(f"{url}/api/state")
    peers = state["peers"]
    ready = (
        len(peers) == 2
        and state["step"] >= 2
        and all(p["loss"] is not None and p["samples_per_second"] > 0 for p in peers)
    )
    return state if ready else None


def prometheus_values(text: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_api_state_and_prometheus_values(swarm):
    url = swarm["url"]
    state = poll_until(lambda: training_state(url), 120, "two training peers in /api/state")
    assert state["run_id"] == RUN and not state["error"]
    assert state["target_batch_size"] == 64
    assert 0 <= state["samples_accumulated"] <= 64 + 2 * 8
    assert state["samples_per_second"] > 0
    assert state["eta_seconds"] is None or 0 <= state["eta_seconds"] < 60
    assert len({p["peer_id"] for p in state["peers"]}) == 2
    for peer in state["peers"]:
        assert abs(peer["step"] - state["step"]) <= 1
        assert peer["samples_contributed"] > 0 and peer["samples_per_second"] > 0
        assert 0 < peer["loss"] < 10 and not peer["client_mode"]
        assert "/ip4/127.0.0.1/tcp/" in peer["reached_at"]
        assert peer["last_seen"] < 10
    history = state["history"]
    assert len(history["seconds"]) == len(history["peers"]) >= 1 and history["loss"]

    values = prometheus_values(get_text(f"{url}/metrics"))
    label = f'run_id="{RUN}"'
    assert values[f"collab_peers{{{label}}}"] == 2
    assert values[f"collab_step{{{label}}}"] >= 2
    assert values[f"collab_samples_per_second{{{label}}}"] > 0
    assert values[f"collab_target_batch_size{{{label}}}"] == 64
    assert 0 <= values[f"collab_samples_accumulated{{{label}}}"] <= 80
    assert 0 < values[f"collab_loss{{{label}}}"] < 10
    for peer in state["peers"]:
        assert values[f'collab_peer_step{{{label},peer="{peer["short_id"]}"}}'] >= 1
        assert values[f'collab_peer_samples_contributed{{{label},peer="{peer["short_id"]}"}}'] > 0


def test_dashboard_in_headless_chromium(swarm):
    from selenium.webdriver.common.by import By

    url = swarm["url"]
    state = poll_until(lambda: training_state(url), 120, "two training peers in /api/state")
    expected = sorted(peer["short_id"] for peer in state["peers"])

    def table_rows(browser):
        rows = browser.find_elements(By.CSS_SELECTOR, "#peer-rows tr[data-peer-id]")
        return rows if len(rows) == 2 else None

    with headless_chromium() as browser:
        browser.get(url)
        rows = poll_until(lambda: table_rows(browser), 30, "two rows in the page's peer table")
        assert sorted(row.find_elements(By.TAG_NAME, "td")[0].text for row in rows) == expected
        first = int(browser.find_element(By.ID, "step").text)
        poll_until(
            lambda: int(browser.find_element(By.ID, "step").text) > first,
            60,
            f"the page's step to advance past {first} without a reload",
        )
        assert browser.find_element(By.ID, "run-id").text == RUN
        assert browser.find_element(By.ID, "loss").text not in ("", "–")
        assert browser.find_elements(By.CSS_SELECTOR, "#chart-loss path.line"), "the loss chart has no line"
        browser.save_screenshot(str(swarm["workdir"] / "dashboard.png"))
        if SCREENSHOT.parent.is_dir() and "--update-screenshot" in sys.argv:
            browser.save_screenshot(str(SCREENSHOT))


def test_unknown_run_shows_no_peers_yet(swarm):
    from selenium.webdriver.common.by import By

    url = swarm["unknown_url"]
    state = poll_until(lambda: (s := get_json(f"{url}/api/state"))["reads"] >= 1 and s, 30, "a first read")
    assert state["peers"] == [] and state["num_peers"] == 0 and not state["error"]
    assert f'collab_peers{{run_id="{UNKNOWN_RUN}"}} 0' in get_text(f"{url}/metrics")
    with headless_chromium() as browser:
        browser.get(url)
        poll_until(lambda: "no peers yet" in browser.find_element(By.ID, "peer-rows").text, 20, "'no peers yet'")


def test_monitor_survives_malformed_records(swarm):
    url, workdir = swarm["url"], swarm["workdir"]
    ready = workdir / "forger.ready"
    command = [sys.executable, "tests/peers/metrics_forger.py", "--run-id", RUN, "--ready-file", str(ready),
               "--initial-peers", *swarm["initial"]]  # fmt: skip
    forger = launch_logged(command, workdir / "forger.log", peer_env())
    try:
        poll_until(ready.exists, 60, "the forger to publish")
        state = poll_until(
            lambda: (s := get_json(f"{url}/api/state"))["skipped_records"] >= 2 and s, 30, "skipped malformed records"
        )
        assert len(state["peers"]) == 2, "a forged record was shown as a peer"
        before = state["reads"]
        poll_until(lambda: get_json(f"{url}/api/state")["reads"] > before + 2, 30, "the monitor to keep reading")
        assert prometheus_values(get_text(f"{url}/metrics"))[f'collab_skipped_records{{run_id="{RUN}"}}'] >= 2
    finally:
        stop_process_group(forger)


def test_status_prints_the_table_once(swarm, capsys):
    state = poll_until(lambda: training_state(swarm["url"]), 120, "two training peers")
    command = [sys.executable, "-m", "collab_core", "status", "--run-id", RUN, "--initial-peers", *swarm["initial"]]
    code, output = run_to_completion(command, timeout=90, env=peer_env())
    assert code == 0, output
    for peer in state["peers"]:
        assert peer["short_id"] in output
    assert re.search(rf"run '{RUN}': step \d+, \d+/64 samples, 2 peer\(s\)", output), output

    # an observer in client mode (it accepts no connections) reads the same records
    assert cli.main(["status", "--run-id", RUN, "--initial-peers", *swarm["initial"], "--json", "--client-mode"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert len(printed["peers"]) == 2 and printed["target_batch_size"] == 64

    assert cli.main(["status", "--run-id", UNKNOWN_RUN, "--initial-peers", *swarm["initial"]]) == 0
    assert "no peers yet" in capsys.readouterr().out


def test_doctor_against_the_swarm(swarm, capsys):
    poll_until(lambda: training_state(swarm["url"]), 120, "two training peers")
    assert cli.main(["doctor", "--run-id", RUN, "--initial-peers", *swarm["initial"]]) == 0
    output = capsys.readouterr().out
    for check in ("initial peers", "inbound connections", "clock", "version"):
        assert f"[ok] {check}" in output, output


def test_unreachable_dht_is_a_clear_error(swarm, capsys):
    dead = f"/ip4/127.0.0.1/tcp/9/p2p/{swarm['dht'].peer_id.to_base58()}"  # the discard port: nothing listens
    assert cli.main(["status", "--run-id", RUN, "--initial-peers", dead, "--timeout", "3"]) == 2
    error = capsys.readouterr().err
    assert "Could not join the collaborative run" in error and dead in error, error
    assert cli.main(["doctor", "--run-id", RUN, "--initial-peers", dead, "--timeout", "3"]) == 1
    output = capsys.readouterr().out
    assert "[FIX] initial peers" in output and f"{dead}: TCP connect: Connection refused" in output, output
    assert "fix: copy COLLAB_INITIAL_PEERS again" in output, output


def test_whole_swarm_restarts_from_the_monitors_backup(swarm):
    """Last in the module: it stops the training peers."""
    backups = swarm["backups"]

    def written() -> list[str] | None:
        paths = get_json(f"{swarm['url']}/api/state").get("backups", [])
        return paths if len(paths) >= KEEP + 1 else None

    poll_until(written, 120, f"{KEEP + 1} backups")
    for peer in swarm["started"]:
        stop_process_group(peer.process)  # the whole swarm goes down

    def settled() -> list[Path] | None:
        # The monitor keeps running: a download that finished just before the peers stopped is still written (the
        # folder appears, then the older ones are pruned, then the API lists it), so read the API after the disk.
        on_disk = sorted(backups.glob(f"{RUN}-step*"))
        paths = get_json(f"{swarm['url']}/api/state").get("backups", [])
        return on_disk if len(on_disk) == KEEP and str(on_disk[-1]) == paths[-1] else None

    on_disk = poll_until(settled, 60, f"--keep {KEEP} backups on disk, the newest reported by /api/state")
    newest = on_disk[-1] / BACKUP_FILE
    backup = torch.load(newest, weights_only=False)
    assert is_backup(backup) and backup["step"] >= BACKUP_EVERY and backup["run_id"] == RUN
    steps = [int(p.name.split("step")[-1]) for p in on_disk]
    assert steps[1] - steps[0] >= BACKUP_EVERY

    # a new swarm (its own run, so that no record of the stopped peers is in view) resumes from the backup
    restart = {**swarm["env"], "COLLAB_RUN_ID": f"{RUN}-restarted"}
    target = backup["step"] + 3
    with PeerSet(swarm["workdir"] / "restarted", restart) as peers:
        (swarm["workdir"] / "restarted").mkdir(exist_ok=True)
        resumed = [
            peers.start(f"resumed{i}", [*core_peer_args(i, steps=target), "--resume", str(newest)]) for i in (0, 1)
        ]
        peers.wait(resumed, timeout=180)
        results = [peer.result() for peer in resumed]
    params = backup["tensors"][: len(backup["metadata"]["param_shapes"])]
    for result in results:
        assert result["resumed_at"]["step"] == backup["step"]
        for loaded, saved in zip(result["resumed_at"]["params"], params, strict=True):
            assert torch.equal(loaded, saved)
        assert result["local_step"] == target
        assert min(result["per_step"]) == backup["step"] + 1, "training did not continue from the backup's step"
    for a, b in zip(results[0]["final"]["params"], results[1]["final"]["params"], strict=True):
        assert (a - b).abs().max().item() <= 1e-6

    # Accelerate: accelerator.load_state(<backup folder>) restores parameters, optimizer state and step
    assert_accelerate_resumes(on_disk[-1], backup, params)


def assert_accelerate_resumes(folder: Path, backup: dict, params: list) -> None:
    from accelerate import Accelerator

    from accelerate_collab import prepare_collaborative
    from tests.peers.core_peer import make_model, make_optimizer
    from tests.support.accelerate_inprocess import config, reset_accelerate_state

    reset_accelerate_state()
    accelerator = Accelerator(cpu=True)
    model = make_model(1)  # other initial weights than the backup's
    optimizer, _ = prepare_collaborative(
        accelerator,
        make_optimizer("sgd", model.parameters()),
        config=config(f"{RUN}-accelerate", 64),
        progress_bar=False,
    )
    try:
        model, optimizer = accelerator.prepare(model, optimizer)
        accelerator.load_state(str(folder))
        assert optimizer.collaborative_step == backup["step"]
        for loaded, saved in zip(model.parameters(), params, strict=True):
            assert torch.equal(loaded.detach(), saved)
        assert optimizer.collaborative_optimizer.state_dict()["optimizer"]["state"], "momentum was not restored"
    finally:
        optimizer.shutdown()
        reset_accelerate_state()


def test_lightning_peer_resumes_from_a_backup_with_ckpt_path(tmp_path):
    """A Lightning peer waits at step 3; the monitor's backup job downloads its state; a new peer (after the first
    one is gone) resumes with ``fit(ckpt_path=backup)`` at step 3 and trains on."""
    from collab_core.monitor.backups import SwarmBackups

    lightning_peer = Path(__file__).resolve().parents[1] / "peers" / "lightning_peer.py"
    common = ["--batch-size", "16", "--samples", "128", "--scheduler", "step", "--no-finish-barrier"]
    with bootstrap_dht() as dht, PeerSet(tmp_path, collab_env(dht, "lightning-backup", target_batch_size=64)) as peers:
        seed = peers.start("seed", [*common, "--steps", "6", "--wait-for-joiner-at-step", "3"], script=lightning_peer)
        poll_until(lambda: "waiting for the joiner at step 3" in seed.log_text(), 180, f"step 3\n{peers.logs()}")
        observer = cli_observer(dht, "lightning-backup")
        try:
            backups = SwarmBackups(observer, "lightning-backup", tmp_path / "backups", every=3, keep=1)
            try:
                path = poll_until(lambda: backups.maybe_backup(3), 60, "a backup at step 3")
            finally:
                backups.shutdown()
        finally:
            observer.shutdown()
        stop_process_group(seed.process)
        # its own run: the stopped seed's record (it had no time to withdraw it) must not hold up the new swarm
        args, env = [*common, "--steps", "5", "--ckpt-in", str(path / BACKUP_FILE)], {"COLLAB_RUN_ID": "restarted"}
        resumed = peers.start("resumed", args, env, script=lightning_peer)
        peers.wait([resumed], timeout=180)
        result = resumed.result()
    assert result["steps_seen_at_start"] == 3, "fit(ckpt_path=backup) must restore the collaborative step"
    assert min(result["per_step"]) == 4 and result["collaborative_step"] == 5


def cli_observer(dht, run_id):
    """A non-training DHT node joined to ``dht`` (what ``collab monitor`` starts)."""
    from collab_core.monitor.reader import join_as_observer

    initial = [str(addr) for addr in dht.get_visible_maddrs()]
    return join_as_observer(run_id, initial, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
