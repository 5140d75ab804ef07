"""The examples run end to end (a few steps, real peers on this machine)."""

from __future__ import annotations

import sys

from tests.support.processes import REPO_ROOT, run_to_completion


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
    returncode, output = run_to_completion(command, timeout=180, env={"COLLAB_RUN_ID": "example"})
    assert returncode == 0, output
    assert 'COLLAB_INITIAL_PEERS="/ip4/127.0.0.1/tcp/' in output  # the join hint with real addresses
    assert "python examples/core_quickstart.py" in output
    assert "(identical)" in output
    for peer in ("peer0", "peer1"):
        assert (tmp_path / peer / "model.pt").exists()


def test_demo_driver_runs_a_collaboration_with_churn(tmp_path):
    """`make demo` in small: 3 Lightning peers (one joins late, one is killed); survivors end identical."""
    out = tmp_path / "demo_out"
    command = [sys.executable, "-m", "examples.demo", "--peers", "3", "--steps", "30", "--output-dir", str(out)]
    returncode, output = run_to_completion(command, timeout=240, env={"PYTHONPATH": str(REPO_ROOT)})
    assert returncode == 0, output
    assert "surviving peers with identical weights: yes" in output
    assert "peer2: SIGKILL" in output and "peer1 started" in output
    for name in ("model.pt", "metrics.csv", "plot.png", "bootstrap.log", "peers/peer0/peer.log"):
        assert (out / name).exists(), name
