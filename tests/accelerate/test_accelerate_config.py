"""Requirement 8: ``collab.yaml`` + ``COLLAB_*`` configure a peer; each mistake names the key/variable and the fix."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from accelerate import Accelerator

from accelerate_collab import CollaborativeConfig, prepare_collaborative
from collab_core import CollaborativeConfigError, CollaborativeSettings
from collab_core.settings import field_names
from tests.peers.accelerate_peer import make_model, make_optimizer
from tests.support.accelerate_inprocess import config
from tests.support.processes import LOOPBACK, REPO_ROOT

EXAMPLE_YAML = REPO_ROOT / "examples" / "accelerate" / "collab.yaml"


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "collab.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_config_is_the_core_settings_schema():
    assert issubclass(CollaborativeConfig, CollaborativeSettings)
    assert tuple(f.name for f in dataclasses.fields(CollaborativeConfig)) == field_names()


def test_example_yaml_uses_only_core_keys_and_loads():
    import yaml

    keys = set(yaml.safe_load(EXAMPLE_YAML.read_text(encoding="utf-8")))
    assert keys <= set(field_names())
    loaded = CollaborativeConfig.from_yaml(EXAMPLE_YAML, env={})
    assert isinstance(loaded, CollaborativeConfig)
    assert {key: getattr(loaded, key) for key in keys} == yaml.safe_load(EXAMPLE_YAML.read_text(encoding="utf-8"))


def test_environment_overrides_yaml(tmp_path):
    path = _yaml(tmp_path, "run_id: from-yaml\ntarget_batch_size: 128\nclient_mode: false\n")
    loaded = CollaborativeConfig.from_yaml(path, env={"COLLAB_TARGET_BATCH_SIZE": "512", "COLLAB_CLIENT_MODE": "1"})
    assert (loaded.run_id, loaded.target_batch_size, loaded.client_mode) == ("from-yaml", 512, True)


def test_unknown_yaml_key_names_the_key_and_the_valid_ones(tmp_path):
    path = _yaml(tmp_path, "target_batchsize: 128\n")
    with pytest.raises(CollaborativeConfigError) as error:
        CollaborativeConfig.from_yaml(path, env={})
    message = str(error.value)
    assert "Unknown key 'target_batchsize'" in message and str(path) in message
    assert "Did you mean 'target_batch_size'?" in message
    assert error.value.setting == "target_batchsize"


def test_unknown_environment_variable_names_the_variable(tmp_path):
    path = _yaml(tmp_path, "run_id: x\n")
    with pytest.raises(CollaborativeConfigError, match="Unknown environment variable COLLAB_TARGET_BATCH") as error:
        CollaborativeConfig.from_yaml(path, env={"COLLAB_TARGET_BATCH": "64"})
    assert "Rename or unset it" in str(error.value)


def test_wrong_type_in_yaml_names_the_key_the_file_and_an_example(tmp_path):
    path = _yaml(tmp_path, "target_batch_size: lots\n")
    with pytest.raises(CollaborativeConfigError) as error:
        CollaborativeConfig.from_yaml(path, env={})
    message = str(error.value)
    assert message.startswith("target_batch_size must be an integer") and "e.g. 4096" in message
    assert f"set by YAML file {path}" in message


def test_wrong_type_in_environment_names_the_variable(tmp_path):
    path = _yaml(tmp_path, "target_batch_size: 64\n")
    with pytest.raises(CollaborativeConfigError) as error:
        CollaborativeConfig.from_yaml(path, env={"COLLAB_CLIENT_MODE": "maybe"})
    assert "COLLAB_CLIENT_MODE='maybe' is not a valid boolean for setting client_mode" in str(error.value)


def test_bad_multiaddr_names_the_key_and_an_example(tmp_path):
    path = _yaml(tmp_path, "initial_peers: [/ip4/1.2.3.4/tcp/31337]\n")
    with pytest.raises(CollaborativeConfigError) as error:
        CollaborativeConfig.from_yaml(path, env={})
    assert error.value.setting == "initial_peers"
    assert "has no /p2p/<peer id> component" in str(error.value) and "12D3KooW" in str(error.value)
    with pytest.raises(CollaborativeConfigError, match="COLLAB_HOST_MADDRS") as error:
        CollaborativeConfig.from_env(env={"COLLAB_HOST_MADDRS": "not-a-multiaddr"})
    assert "host_maddrs: 'not-a-multiaddr' is not a valid multiaddr" in str(error.value)


def test_client_mode_puts_dht_and_averaging_in_client_mode(run_id):
    """client_mode from the config: the DHT it starts listens nowhere and the averager runs as a client."""
    import hivemind

    with_server = hivemind.DHT(host_maddrs=[LOOPBACK], start=True)
    try:
        initial = [str(addr) for addr in with_server.get_visible_maddrs()]
        settings = config(run_id, 64, client_mode=True, host_maddrs=[], initial_peers=initial)
        accelerator = Accelerator()
        optimizer, _ = prepare_collaborative(
            accelerator, make_optimizer(make_model(0).parameters()), config=settings, progress_bar=False
        )
        try:
            collaborative = optimizer.collaborative_optimizer
            assert collaborative.dht.client_mode
            assert collaborative.client_mode
            assert collaborative._averager.client_mode  # hivemind's averager accepts no incoming requests
            with pytest.raises(ValueError):  # nothing to connect to
                collaborative.dht.get_visible_maddrs()
        finally:
            optimizer.shutdown()
        assert not optimizer.collaborative_optimizer.dht.is_alive()  # the DHT it started is shut down with it
    finally:
        with_server.shutdown()
