"""Broken configuration (issue 7, scenarios 10 and 11).

Scenario 10 runs a real peer process against an unreachable and a malformed ``COLLAB_INITIAL_PEERS``: it must end
within a bounded time with a message naming the address and what to check, leaving no process behind. The
in-process variants (a closed port, a port that never speaks libp2p) are in ``tests/unit/test_dht_startup.py``.

Scenario 11 is the bad-configuration table. Its rows live in ``tests/support/bad_settings.py`` (``BAD_PYTHON_VALUES``,
``BAD_ENV_VALUES``, ``BAD_YAML_VALUES``, each a test per row asserting the setting named and the fix); here a table
of the missing rows adds one wrong-type and one out-of-range value per setting through YAML and ``COLLAB_*``, and a
coverage check makes sure every setting has rows of each kind.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import hivemind
import pytest

from collab_core.settings import CollaborativeConfigError, CollaborativeSettings, env_var
from tests.support.bad_settings import BAD_ENV_VALUES, BAD_PYTHON_VALUES, BAD_YAML_VALUES
from tests.support.processes import LOOPBACK, PeerSet
from tests.support.reliability import group_ends, peer_args, start

STARTUP_TIMEOUT = 8.0


def dead_peer_address() -> str:
    """A complete multiaddr (real peer id) whose port is closed: its DHT has been shut down."""
    dht = hivemind.DHT(host_maddrs=[LOOPBACK], start=True)
    try:
        return str(dht.get_visible_maddrs()[0])
    finally:
        dht.shutdown()


@pytest.mark.parametrize("kind", ["unreachable", "malformed"])
def test_bad_initial_peers_end_the_peer_with_a_clear_error(tmp_path, kind):
    """Scenario 10: the peer exits (non-zero) in bounded time; the message names the address and what to check."""
    address = dead_peer_address() if kind == "unreachable" else "/ip4/127.0.0.1/tcp/not-a-port"
    env = {"COLLAB_RUN_ID": "bad-peers", "COLLAB_INITIAL_PEERS": address, "COLLAB_HOST_MADDRS": LOOPBACK}
    with PeerSet(tmp_path, env) as peers:
        began = time.monotonic()
        peer = start(peers, "peer", peer_args(8, 1, "--startup-timeout", str(STARTUP_TIMEOUT), steps=1))
        code = peer.process.wait(STARTUP_TIMEOUT + 60)  # interpreter + torch start-up, then the bounded DHT start
        elapsed = time.monotonic() - began
        log = peer.log_text()
        gone = group_ends(peer.process.pid)
    print(f"\n{kind} initial peer: exit {code} after {elapsed:.1f}s (start-up timeout {STARTUP_TIMEOUT:g}s)")
    assert code != 0
    assert address in log and "COLLAB_INITIAL_PEERS" in log
    if kind == "unreachable":
        assert "DHTStartupError" in log and "still running" in log and "reachable" in log
    else:
        assert "CollaborativeConfigError" in log and "is not a valid multiaddr" in log
    assert gone, "the peer left processes behind"


# one wrong-type and one out-of-range value for every setting, as text in YAML and in the environment
WRONG_TYPE = {
    "run_id": ("[a, b]", None),
    "target_batch_size": ("many", "many"),
    "batch_size": ("[1]", "x"),
    "initial_peers": ("{a: 1}", None),
    "host_maddrs": ("5", None),
    "announce_maddrs": ("{a: 1}", None),
    "client_mode": ("'yes please'", "yes please"),
    "identity_path": ("[a]", None),
    "use_ipfs": ("3", "sometimes"),
    "averaging_timeout": ("soon", "soon"),
    "matchmaking_time": ("[1]", "fast"),
    "min_refresh_period": ("{}", "often"),
    "max_refresh_period": ("[]", "rarely"),
    "default_refresh_period": ("'x'", "x"),
    "metadata_expiration": ("never", "never"),
    "step_tolerance": ("1.5", "1.5"),
    "reuse_grad_buffers": ("2", "maybe"),
    "accumulate_grads_on": ("[cpu]", None),
    "algorithm": ("[gradient]", None),
    "average_opt_statistics": ("5", None),
    "outer_lr": ("fast", "fast"),
    "outer_momentum": ("[0.9]", "high"),
    "outer_nesterov": ("2", "maybe"),
    "compression": ("[none]", None),
    "verbose": ("'loud'", "loud"),
}
OUT_OF_RANGE = {
    "run_id": "'has space'",
    "target_batch_size": "0",
    "batch_size": "-3",
    "initial_peers": "['/ip4/1.2.3.4/tcp/1']",
    "host_maddrs": "['localhost:80']",
    "announce_maddrs": "['/ip4/1.2.3.4/tcp/0']",
    "averaging_timeout": "-1",
    "matchmaking_time": "0",
    "min_refresh_period": "-0.5",
    "max_refresh_period": "0",
    "default_refresh_period": ".nan",
    "metadata_expiration": "-60",
    "step_tolerance": "-1",
    "accumulate_grads_on": "gpu7",
    "algorithm": "gradients",
    "outer_lr": "0",
    "outer_momentum": "1.5",
    "compression": "zip",
}
NO_RANGE = {
    "client_mode",
    "identity_path",
    "use_ipfs",
    "reuse_grad_buffers",
    "average_opt_statistics",
    "outer_nesterov",
    "verbose",
}
FIELDS = [field.name for field in dataclasses.fields(CollaborativeSettings)]


def assert_names_setting_and_fix(error: CollaborativeConfigError, setting: str) -> None:
    message = str(error)
    assert error.setting == setting
    assert setting in message
    # the fix: an example of a valid value, the accepted values, or what to change
    assert any(hint in message for hint in ("e.g.", "must be", "expected", "accepted", "use ", "set ", "Did you")), (
        message
    )


@pytest.mark.parametrize("setting", FIELDS)
def test_wrong_type_in_yaml(tmp_path: Path, setting: str) -> None:
    path = tmp_path / "collab.yaml"
    path.write_text(f"{setting}: {WRONG_TYPE[setting][0]}\n")
    with pytest.raises(CollaborativeConfigError) as info:
        CollaborativeSettings.from_yaml(path, env={})
    assert_names_setting_and_fix(info.value, setting)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("setting", [name for name in FIELDS if WRONG_TYPE[name][1] is not None])
def test_wrong_type_in_env(setting: str) -> None:
    variable = env_var(setting)
    with pytest.raises(CollaborativeConfigError) as info:
        CollaborativeSettings.from_env({variable: WRONG_TYPE[setting][1]})
    assert_names_setting_and_fix(info.value, setting)
    assert variable in str(info.value)


@pytest.mark.parametrize("setting", sorted(OUT_OF_RANGE))
def test_out_of_range_in_yaml(tmp_path: Path, setting: str) -> None:
    path = tmp_path / "collab.yaml"
    path.write_text(f"{setting}: {OUT_OF_RANGE[setting]}\n")
    with pytest.raises(CollaborativeConfigError) as info:
        CollaborativeSettings.from_yaml(path, env={})
    assert_names_setting_and_fix(info.value, setting)


def test_every_setting_has_a_row_of_each_kind() -> None:
    """The table covers every setting: wrong type (here), out of range (here, or not applicable), and the unknown
    key, unknown variable and conflicting pair rows of tests/support/bad_settings.py exist."""
    assert set(WRONG_TYPE) == set(FIELDS)
    assert set(OUT_OF_RANGE) | NO_RANGE == set(FIELDS)
    assert any(row[1] == "target_bach_size" for row in BAD_YAML_VALUES)  # unknown YAML key
    assert any(row[1] == "COLLAB_BATCH_SZE" for row in BAD_ENV_VALUES)  # unknown COLLAB_* variable
    conflicting = {row[1] for row in BAD_PYTHON_VALUES if len(row[0]) == 2}
    assert {"min_refresh_period", "reuse_grad_buffers", "use_ipfs"} <= conflicting  # conflicting pairs
