"""examples/fabric/train.py, run for real: one peer configured by COLLAB_* alone, in DiLoCo mode."""

from __future__ import annotations

import json
import sys

import torch

from tests.support.processes import LOOPBACK, REPO_ROOT, run_to_completion

TRAIN = REPO_ROOT / "examples" / "fabric" / "train.py"


def test_the_fabric_example_trains_in_diloco_mode_from_the_environment_and_saves_the_step(tmp_path):
    env = {
        "COLLAB_HOST_MADDRS": LOOPBACK,
        "COLLAB_RUN_ID": "fabric-example",
        "COLLAB_TARGET_BATCH_SIZE": "128",
        "COLLAB_ALGORITHM": "diloco",
        "PYTHONPATH": str(REPO_ROOT),
    }
    command = [sys.executable, str(TRAIN), "--steps", "6", "--seed", "1", "--output-dir", str(tmp_path)]
    returncode, output = run_to_completion(command, timeout=180, env=env)
    assert returncode == 0, output[-4000:]
    assert 'COLLAB_RUN_ID=fabric-example COLLAB_INITIAL_PEERS="' in output  # the join hint
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["algorithm"] == "diloco" and summary["optimizer"] == "DiLoCoOptimizer"
    assert summary["collaborative_step"] == 6
    assert summary["micro_batches"] == 6 * 4  # 4 inner steps (128 samples / 32) per outer step, alone
    assert summary["val_accuracy"] > 0.5, summary
    checkpoint = torch.load(tmp_path / "checkpoint.ckpt", weights_only=False)
    assert checkpoint["optimizer"]["local_step"] == 6
