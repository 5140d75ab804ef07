"""Keeps ``python -m bench`` working: W1 with 3 measured steps, our side only (real peers on loopback)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_w1_smoke(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "bench", "--workload", "W1", "--sides", "ours", "--measure", "3"]
    command += ["--warmup", "0", "--join-after", "1", "--timeout", "50", "--results-dir", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "(a) step time / 0.4 s" in done.stdout
    (result,) = tmp_path.glob("*.json")
    w1 = json.loads(result.read_text())["workloads"]["W1"]
    assert "ours_error" not in w1, w1.get("ours_error")
    figures = w1["ours"]
    assert figures["step_seconds"]["n"] == 3
    assert figures["shared_steps"] == 3  # both peers took every measured step together
    assert figures["param_diff"] <= 1e-6
    assert figures["join_seconds"]["median"] > 0
    assert list(tmp_path.glob("*_w1_timeline.png"))
