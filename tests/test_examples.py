"""The examples run end to end (a few steps, real peers on this machine)."""

from __future__ import annotations

import os
import subprocess
import sys

from peer_processes import REPO_ROOT, stop_process_group


def test_core_quickstart_demo_trains_identical_peers(tmp_path):
    command = [
        sys.executable,
        "examples/core_quickstart.py",
        "--demo",
        "--peers",
        "2",
        "--steps",
        "3",
        "--output-dir",
        str(tmp_path),
    ]
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "COLLAB_RUN_ID": "example"},
    )
    try:
        output, _ = process.communicate(timeout=180)
    finally:
        stop_process_group(process)
    assert process.returncode == 0, output
    assert 'COLLAB_INITIAL_PEERS="/ip4/127.0.0.1/tcp/' in output  # the join hint with real addresses
    assert "python examples/core_quickstart.py" in output
    assert "(identical)" in output
    for peer in ("peer0", "peer1"):
        assert (tmp_path / peer / "model.pt").exists()


def test_demo_driver_runs_a_collaboration_with_churn(tmp_path):
    """`make demo` in small: 3 Lightning peers (one joins late, one is killed); survivors end identical."""
    out = tmp_path / "demo_out"
    command = [sys.executable, "-m", "examples.demo", "--peers", "3", "--steps", "30", "--output-dir", str(out)]
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    try:
        output, _ = process.communicate(timeout=240)
    finally:
        stop_process_group(process)
    assert process.returncode == 0, output
    assert "surviving peers with identical weights: yes" in output
    assert "peer2: SIGKILL" in output and "peer1 started" in output
    for name in ("model.pt", "metrics.csv", "plot.png", "bootstrap.log", "peers/peer0/peer.log"):
        assert (out / name).exists(), name
