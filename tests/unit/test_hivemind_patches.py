"""collab_core's hivemind workarounds are applied explicitly (start_dht, the optimizer), never by an import.

The test process itself has them applied (``tests/conftest.py``), so each check runs in a fresh interpreter.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from hivemind.dht.protocol import DHTProtocol

from collab_core import hivemind_patches
from tests.support.processes import REPO_ROOT, peer_env

pytestmark = pytest.mark.timeout(120)

# prints whether hivemind's DHTProtocol has collab_core's replacement of _validate_dictionary
PATCHED = (
    "from hivemind.dht.protocol import DHTProtocol\n"
    "def patched():\n"
    "    return DHTProtocol._validate_dictionary.__module__ == 'collab_core.hivemind_patches'\n"
)


def run_python(code: str) -> str:
    """Run ``code`` in a fresh interpreter (repository on the path); its stdout. Fails with its output on an error."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO_ROOT,
        env=peer_env({"HIVEMIND_LOGLEVEL": "ERROR"}),
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_importing_the_packages_leaves_hivemind_unpatched() -> None:
    out = run_python(
        PATCHED
        + """
import collab_core, collab_core.dht, collab_core.optimizer, lightning_collab, accelerate_collab
print("patched" if patched() or collab_core.hivemind_patches.is_applied() else "unpatched")
"""
    )
    assert out.split()[-1] == "unpatched"


def test_start_dht_applies_the_patches_before_it_starts_the_dht() -> None:
    # run_coroutine runs in the DHT's own (forked) process: the workaround must be in effect there
    out = run_python(
        PATCHED
        + """
from collab_core import CollaborativeSettings, start_dht

async def protocol_patched(dht, node):
    return type(node.protocol)._validate_dictionary.__module__ == "collab_core.hivemind_patches"

before = patched()
dht, _ = start_dht(CollaborativeSettings(host_maddrs=["/ip4/127.0.0.1/tcp/0"]), print_hint=False)
try:
    print(before, patched(), dht.run_coroutine(protocol_patched))
finally:
    dht.shutdown()
"""
    )
    assert out.split()[-3:] == ["False", "True", "True"]


def test_building_a_collaborative_optimizer_applies_the_patches() -> None:
    out = run_python(
        PATCHED
        + """
import hivemind, torch
from collab_core import CollaborativeOptimizer

dht = hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
model = torch.nn.Linear(2, 1)
sgd = torch.optim.SGD(model.parameters(), lr=0.1)
opt = CollaborativeOptimizer(sgd, dht=dht, prefix="patches", target_batch_size=8)
try:
    print(patched())
finally:
    opt.shutdown()
    dht.shutdown()
"""
    )
    assert out.split()[-1] == "True"


def test_apply_is_idempotent() -> None:
    hivemind_patches.apply()
    installed = DHTProtocol._validate_dictionary
    hivemind_patches.apply()
    assert DHTProtocol._validate_dictionary is installed
    assert hivemind_patches.is_applied()
