"""examples/lightning: the README's "Train with Lightning" flow, run for real with two LightningCLI peers."""

from __future__ import annotations

import json
import re
import sys
import time

import pytest
import torch

from tests.support.console_output import (
    absurd_etas,
    bar_metric,
    etas,
    join_hints,
    most_lines_in_one_second,
    our_log_lines,
)
from tests.support.processes import LOOPBACK, REPO_ROOT, PeerSet, run_to_completion

TRAIN = REPO_ROOT / "examples" / "lightning" / "train.py"
CONFIG = REPO_ROOT / "examples" / "lightning" / "config.yaml"
LAUNCH = REPO_ROOT / "tests" / "peers" / "run_script.py"
HINT = re.compile(r'COLLAB_RUN_ID=(\S+) COLLAB_INITIAL_PEERS="([^"]+)"')


def _wait_for_hint(peer, timeout: float = 120.0) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = HINT.search(peer.log_text())
        if match:
            return {"COLLAB_RUN_ID": match.group(1), "COLLAB_INITIAL_PEERS": match.group(2)}
        if peer.process.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"the first peer printed no join hint:\n{peer.log_text()[-4000:]}")


@pytest.mark.slow
def test_two_lightning_cli_peers_from_the_yaml_config(tmp_path):
    # the progress bar stays on: this is what a newcomer sees
    common = ["fit", "--config", str(CONFIG), "--model.collaborative_steps", "4", "--model.wait_for_peers", "2",
              "--trainer.logger", "false", "--trainer.strategy.init_args.matchmaking_time", "10"]  # fmt: skip
    with PeerSet(tmp_path, {"COLLAB_HOST_MADDRS": LOOPBACK}) as peers:
        # PeerSet passes --name/--out first: the CLI script takes them via the launcher below
        first = peers.start("first", [str(TRAIN), *common, "--output_dir", str(tmp_path / "first")], script=LAUNCH)
        hint = _wait_for_hint(first)
        # the second peer: the printed hint, and client mode from the command line (i.e. from the YAML's strategy)
        second_args = [*common, "--output_dir", str(tmp_path / "second"), "--trainer.strategy.init_args.client_mode",
                       "true"]  # fmt: skip
        second = peers.start("second", [str(TRAIN), *second_args], env=hint, script=LAUNCH)
        peers.wait([first, second], timeout=240)
        summaries = {name: json.loads((tmp_path / name / "summary.json").read_text()) for name in ("first", "second")}
        logs = {name: peer.log_text() for name, peer in (("first", first), ("second", second))}
    assert {s["collaborative_step"] for s in summaries.values()} == {4}
    a, b = (torch.load(tmp_path / name / "model.pt") for name in ("first", "second"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert "This peer runs in client mode" in logs["second"]
    for name, console in logs.items():
        check_console_reads_well(name, console)


def check_console_reads_well(name: str, console: str) -> None:
    """What a person sees of one peer: the join hint once; our numbers in Lightning's progress bar (sane ETAs) and,
    at INFO, only state changes, at a human pace (the old tracker logged every refresh: ~40 lines/s alone)."""
    assert join_hints(console) == 1, f"{name}: the join hint should be printed once\n{console[-3000:]}"
    assert absurd_etas(console) == [], f"{name}: absurd ETAs {absurd_etas(console)}"
    assert 2.0 in bar_metric(console, "collab/peers"), f"{name}: Lightning's bar lacks our numbers"
    assert etas(console), f"{name}: no ETA in Lightning's bar"
    assert most_lines_in_one_second(console, ("INFO", "WARNING")) <= 4, f"{name}: too many lines\n{console[-3000:]}"
    for _, level, message in our_log_lines(console):
        if level == "INFO" and ": step " in message:  # a status line at INFO: only with news, in parentheses
            assert message.endswith(")"), f"{name}: a status line without a state change at INFO: {message}"


def test_strategy_help_shows_the_docstrings():
    returncode, output = run_to_completion(
        [sys.executable, str(TRAIN), "fit", "--trainer.strategy.help", "lightning_collab.CollaborativeStrategy"],
        timeout=120,
        env={"PYTHONPATH": str(REPO_ROOT)},
    )
    assert returncode == 0, output
    assert "--trainer.strategy.target_batch_size" in output
    assert "Samples all peers accumulate together" in " ".join(output.split())
    assert "--trainer.strategy.client_mode" in output


def test_the_diloco_config_trains_in_diloco_mode(tmp_path):
    """examples/lightning/config_diloco.yaml (two settings more than config.yaml) trains a peer in DiLoCo mode, as
    well as gradient mode does, for the config's whole run (40 outer steps; it diverged with outer momentum 0.9)."""
    config = REPO_ROOT / "examples" / "lightning" / "config_diloco.yaml"
    differences = set(config.read_text().splitlines()) - set(CONFIG.read_text().splitlines())
    assert sorted(line.split("#")[0].strip() for line in differences if not line.startswith("#")) == [
        "algorithm: diloco",
        "outer_momentum: 0.5",
    ]
    command = [sys.executable, str(TRAIN), "fit", "--config", str(config), "--data.seed", "0",
               "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
               "--output_dir", str(tmp_path)]  # fmt: skip
    env = {"COLLAB_HOST_MADDRS": LOOPBACK, "PYTHONPATH": str(REPO_ROOT)}
    returncode, output = run_to_completion(command, timeout=180, env=env)
    assert returncode == 0, output[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["algorithm"] == "diloco" and summary["collaborative_step"] == 40
    assert summary["optimizer_calls"] >= 40 * 8  # 8 inner steps (256 samples / 32) per outer step, alone
    assert summary["val_accuracy"] > 0.9, summary  # gradient mode: 0.95
