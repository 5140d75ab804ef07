"""``examples/accelerate/train.py`` with the exact commands of docs/accelerate.md: two ``accelerate launch`` peers."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch

from tests.support.accelerate_launching import LaunchedPeers
from tests.support.console_output import absurd_etas, bar_frames, join_hints, most_lines_in_one_second
from tests.support.processes import LOOPBACK, REPO_ROOT

EXAMPLE = REPO_ROOT / "examples" / "accelerate" / "train.py"
CONFIG = REPO_ROOT / "examples" / "accelerate" / "collab.yaml"
HINT = re.compile(r'COLLAB_INITIAL_PEERS="([^"]+)"')
STEPS = 10


def _wait_for_hint(peer, timeout: float = 90.0) -> str:
    """The join hint the first peer prints (what a user copies into the second peer's environment)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = HINT.search(peer.log_text())
        if found:
            return found.group(1)
        if peer.process.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"the first peer printed no join hint\n{peer.log_text()[-4000:]}")


@pytest.mark.slow
def test_example_two_peers_train_identical_models(tmp_path):
    from safetensors.torch import load_file

    env = {"COLLAB_RUN_ID": "digits-example-test", "COLLAB_HOST_MADDRS": LOOPBACK}
    common = ["--collab-config", str(CONFIG), "--max-steps", str(STEPS), "--min-peers", "2"]
    with LaunchedPeers(tmp_path, env) as peers:
        first = peers.start(
            "first", [*common, "--seed", "1", "--output-dir", str(tmp_path / "first")], script=EXAMPLE, pass_name=False
        )
        initial_peers = _wait_for_hint(first)
        assert "/ip4/127.0.0.1/tcp/" in initial_peers and "/p2p/" in initial_peers
        second = peers.start(
            "second",
            [*common, "--seed", "2", "--output-dir", str(tmp_path / "second")],
            script=EXAMPLE,
            pass_name=False,
            env={"COLLAB_INITIAL_PEERS": initial_peers},
            launch_args=["--mixed_precision", "bf16"],
        )
        peers.wait([first, second], timeout=180)
        logs = peers.logs()
        consoles = {"first": first.console_text(), "second": second.console_text()}

    results = {name: json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("first", "second")}
    models = {name: load_file(str(tmp_path / name / "model.safetensors")) for name in ("first", "second")}
    print(results)
    for result in results.values():
        assert result["collaborative_step"] == STEPS
        assert result["num_peers"] == 2
        assert result["test_accuracy"] >= 0.7
    diff = max((models["first"][k] - models["second"][k]).abs().max().item() for k in models["first"])
    print(f"max |first - second| = {diff:.3e}")
    assert diff <= 1e-6
    assert all(t.dtype == torch.float32 for t in models["second"].values())
    assert "collaborative step" in logs  # the progress bar
    for name, console in consoles.items():
        check_console_reads_well(name, console)
    # whoever took the steps itself saw its bar fill (a peer that downloaded may have jumped over every step)
    assert any(frame.n == frame.total for console in consoles.values() for frame in bar_frames(console))


def check_console_reads_well(name: str, console: str) -> None:
    """What a person sees of one peer: the join hint once, the bar at a human pace, integer steps, no absurd ETA,
    nothing of the bar after the final summary, and, for a peer that took every step itself, a bar that ends full.

    A peer that downloaded the state is exempt from the last: in a run of about a second (10 steps) its steps can
    all fall between two redraws (0.5 s apart) and its state then jump by a download, so no redraw of it is full."""
    assert join_hints(console) == 1, f"{name}: the join hint should be printed once\n{console[-3000:]}"
    assert absurd_etas(console) == [], f"{name}: absurd ETAs {absurd_etas(console)}"
    assert most_lines_in_one_second(console, ("INFO", "WARNING")) <= 4, f"{name}: too many lines\n{console[-3000:]}"
    frames = bar_frames(console)
    assert frames, f"{name}: no progress bar\n{console[-3000:]}"
    assert all(frame.step.isdigit() for frame in frames), f"{name}: steps {sorted({f.step for f in frames})}"
    assert all(frame.total == 128 and frame.n <= frame.total for frame in frames)
    # redrawn about twice a second (+ the first and the closing frame), not once per call; a line logged above the
    # bar makes tqdm redraw it once more (those lines are bounded above)
    refreshes = [frame for frame in frames if not frame.after_write]
    assert len(refreshes) <= 3 * (frames[-1].elapsed_seconds + 1) + 2, f"{name}: {len(refreshes)} frames\n{console}"
    assert all("samples/s" in frame.postfix and "ETA" in frame.postfix for frame in frames[1:])
    summary = console.index("finished: ")
    assert not bar_frames(console[summary:]), f"{name}: the bar was drawn after the summary\n{console[summary:]}"
    if "Downloading the state" not in console:  # else its last step may have come by a download, unfilled
        assert frames[-1].step == str(STEPS) and frames[-1].n == frames[-1].total, f"{name}: ends with {frames[-1]}"


def test_example_reports_a_bad_config_key_and_exits(tmp_path):
    bad = tmp_path / "collab.yaml"
    bad.write_text("run_id: digits\ntarget_batch: 128\n", encoding="utf-8")
    with LaunchedPeers(tmp_path, {}) as peers:
        peer = peers.start("bad", ["--collab-config", str(bad)], script=EXAMPLE, pass_name=False, launcher="python")
        assert peer.process.wait(120) != 0
    log = peer.log_text()
    assert f"Unknown key 'target_batch' in settings file {bad}" in log
    assert "Did you mean 'target_batch_size'?" in log


def test_the_diloco_config_trains_in_diloco_mode(tmp_path):
    """examples/accelerate/collab_diloco.yaml (two settings more than collab.yaml) trains a peer in DiLoCo mode, as
    well as gradient mode does, for the example's whole run (40 outer steps)."""
    import sys

    from tests.support.processes import run_to_completion

    config = REPO_ROOT / "examples" / "accelerate" / "collab_diloco.yaml"
    differences = set(config.read_text().splitlines()) - set(CONFIG.read_text().splitlines())
    assert sorted(line.split("#")[0].strip() for line in differences if not line.startswith("#")) == [
        "algorithm: diloco",
        "outer_momentum: 0.5",
    ]
    command = [sys.executable, str(EXAMPLE), "--collab-config", str(config), "--seed", "0", "--output-dir",
               str(tmp_path)]  # fmt: skip
    env = {"COLLAB_RUN_ID": "digits-diloco-test", "COLLAB_HOST_MADDRS": LOOPBACK, "PYTHONPATH": str(REPO_ROOT)}
    returncode, output = run_to_completion(command, timeout=180, env=env)
    assert returncode == 0, output[-4000:]
    result = json.loads((tmp_path / "metrics.json").read_text())
    assert result["algorithm"] == "diloco" and result["collaborative_step"] == 40
    assert result["test_accuracy"] > 0.9, result  # gradient mode: 0.93
