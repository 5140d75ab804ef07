"""Tests for collab_core.settings: precedence of sources, parsing, validation and error messages."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import hivemind.compression
import pytest
import torch

import collab_core.settings as settings_module
from collab_core.settings import (
    COMPRESSION_CLASSES,
    CollaborativeConfigError,
    CollaborativeSettings,
    describe_settings,
    env_var,
    field_names,
)
from tests.support.bad_settings import BAD_ENV_VALUES, BAD_PYTHON_VALUES, BAD_YAML_VALUES, PEER_A, PEER_B


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "collab.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def assert_mentions(error: CollaborativeConfigError, *fragments: str) -> None:
    message = str(error)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not found in error message: {message}"


# ---------------------------------------------------------------------- defaults and helpers


def test_defaults() -> None:
    settings = CollaborativeSettings()
    assert settings.run_id == "collab"
    assert settings.target_batch_size == 4096
    assert settings.batch_size is None
    assert settings.initial_peers == []
    assert settings.host_maddrs == ["/ip4/0.0.0.0/tcp/0"]
    assert settings.compression == "none"
    assert settings.min_refresh_period == 0.5 and settings.max_refresh_period == 30.0
    # mutable defaults are not shared between instances
    assert CollaborativeSettings().host_maddrs is not settings.host_maddrs


def test_every_field_has_one_sentence_help_and_an_env_var() -> None:
    rows = describe_settings()
    assert [row["name"] for row in rows] == list(field_names())
    for f, row in zip(dataclasses.fields(CollaborativeSettings), rows, strict=True):
        assert f.metadata["help"] == row["help"]
        assert row["help"].endswith(".") and row["help"][0].isupper()
        assert row["env_var"] == "COLLAB_" + f.name.upper() == env_var(f.name)
    types = {row["name"]: row["type"] for row in rows}
    assert types["batch_size"] == "int | None"
    assert types["initial_peers"] == "list[str]"
    assert types["averaging_timeout"] == "float"
    assert types["verbose"] == "bool"
    assert {row["name"]: row["default"] for row in rows}["host_maddrs"] == ["/ip4/0.0.0.0/tcp/0"]


def test_env_var_rejects_unknown_names() -> None:
    with pytest.raises(CollaborativeConfigError) as info:
        env_var("batchsize")
    assert_mentions(info.value, "'batchsize'", "Did you mean 'batch_size'?")


def test_to_dict_round_trips() -> None:
    settings = CollaborativeSettings(initial_peers=[PEER_A], batch_size=32)
    data = settings.to_dict()
    assert set(data) == set(field_names())
    assert data["initial_peers"] == [PEER_A] and data["initial_peers"] is not settings.initial_peers
    assert CollaborativeSettings(**data) == settings


@pytest.mark.parametrize("name", list(COMPRESSION_CLASSES))
def test_make_compression(name: str) -> None:
    compression = CollaborativeSettings(compression=name).make_compression()
    assert type(compression) is getattr(hivemind.compression, COMPRESSION_CLASSES[name])


def test_optimizer_kwargs() -> None:
    settings = CollaborativeSettings(
        run_id="my-run",
        batch_size=16,
        accumulate_grads_on="cpu",
        compression="float16",
        average_opt_statistics=["exp_avg_sq"],
    )
    kwargs = settings.optimizer_kwargs()
    assert set(kwargs) == {
        "prefix",
        "target_batch_size",
        "batch_size_per_step",
        "min_refresh_period",
        "max_refresh_period",
        "default_refresh_period",
        "metadata_expiration",
        "averaging_timeout",
        "step_tolerance",
        "reuse_grad_buffers",
        "accumulate_grads_on",
        "client_mode",
        "verbose",
        "matchmaking_time",
        "compression",
    }
    assert kwargs["prefix"] == "my-run"
    assert kwargs["batch_size_per_step"] == 16
    assert kwargs["accumulate_grads_on"] == torch.device("cpu")
    assert isinstance(kwargs["compression"], hivemind.compression.Float16Compression)
    assert CollaborativeSettings().optimizer_kwargs()["accumulate_grads_on"] is None


# ---------------------------------------------------------------------- precedence


def test_precedence_explicit_over_env_over_yaml_over_defaults(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path,
        "run_id: yaml-run\ntarget_batch_size: 100\nbatch_size: 10\nverbose: true\naveraging_timeout: 12\n",
    )
    env = {"COLLAB_RUN_ID": "env-run", "COLLAB_BATCH_SIZE": "20", "COLLAB_AVERAGING_TIMEOUT": "7.5", "HOME": "/x"}
    settings = CollaborativeSettings.resolve(path, env=env, run_id="explicit-run", averaging_timeout=None)
    assert settings.run_id == "explicit-run"  # explicit beats env and YAML
    assert settings.batch_size == 20  # env beats YAML
    assert settings.averaging_timeout == 7.5  # explicit None means "not given"
    assert settings.target_batch_size == 100  # YAML beats defaults
    assert settings.verbose is True
    assert settings.matchmaking_time == 5.0  # default


def test_from_yaml_and_from_env(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "target_batch_size: 100\nstep_tolerance: 3\n")
    settings = CollaborativeSettings.from_yaml(path, env={"COLLAB_STEP_TOLERANCE": "0"})
    assert (settings.target_batch_size, settings.step_tolerance) == (100, 0)
    assert CollaborativeSettings.from_env({"COLLAB_TARGET_BATCH_SIZE": "64"}).target_batch_size == 64


def test_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLLAB_TARGET_BATCH_SIZE", "128")
    assert CollaborativeSettings.from_env().target_batch_size == 128
    assert CollaborativeSettings.resolve().target_batch_size == 128


def test_empty_yaml_file_gives_defaults(tmp_path: Path) -> None:
    assert CollaborativeSettings.from_yaml(write_yaml(tmp_path, "# nothing\n"), env={}) == CollaborativeSettings()


# ---------------------------------------------------------------------- parsing


def test_env_parsing_of_every_kind() -> None:
    env = {
        "COLLAB_INITIAL_PEERS": f" {PEER_A},{PEER_B}\n",
        "COLLAB_HOST_MADDRS": "/ip4/127.0.0.1/tcp/0   /ip6/::1/tcp/0",
        "COLLAB_AVERAGE_OPT_STATISTICS": "exp_avg_sq, exp_avg",
        "COLLAB_ANNOUNCE_MADDRS": "",
        "COLLAB_CLIENT_MODE": "YES",
        "COLLAB_VERBOSE": "off",
        "COLLAB_AVERAGING_TIMEOUT": "45",
        "COLLAB_MATCHMAKING_TIME": "2.5e0",
        "COLLAB_BATCH_SIZE": "None",
        "COLLAB_IDENTITY_PATH": "",
        "COLLAB_ACCUMULATE_GRADS_ON": "cpu",
        "COLLAB_TARGET_BATCH_SIZE": " +512 ",
    }
    settings = CollaborativeSettings.from_env(env)
    assert settings.initial_peers == [PEER_A, PEER_B]
    assert settings.host_maddrs == ["/ip4/127.0.0.1/tcp/0", "/ip6/::1/tcp/0"]
    assert settings.average_opt_statistics == ["exp_avg_sq", "exp_avg"]
    assert settings.announce_maddrs == []
    assert settings.client_mode is True and settings.verbose is False
    assert settings.averaging_timeout == 45.0 and isinstance(settings.averaging_timeout, float)
    assert settings.matchmaking_time == 2.5
    assert settings.batch_size is None and settings.identity_path is None
    assert settings.accumulate_grads_on == "cpu"
    assert settings.target_batch_size == 512


@pytest.mark.parametrize("text", ["1", "true", "True", "yes", "ON"])
def test_env_true_values(text: str) -> None:
    assert CollaborativeSettings.from_env({"COLLAB_USE_IPFS": text}).use_ipfs is True


@pytest.mark.parametrize("text", ["0", "false", "FALSE", "no", "Off"])
def test_env_false_values(text: str) -> None:
    assert CollaborativeSettings.from_env({"COLLAB_REUSE_GRAD_BUFFERS": text}).reuse_grad_buffers is False


def test_yaml_single_string_for_list_and_int_for_float(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, f"initial_peers: {PEER_A}\naveraging_timeout: 10\nbatch_size: null\n")
    settings = CollaborativeSettings.from_yaml(path, env={})
    assert settings.initial_peers == [PEER_A]
    assert settings.averaging_timeout == 10.0 and isinstance(settings.averaging_timeout, float)
    assert settings.batch_size is None


def test_python_values_are_normalised() -> None:
    settings = CollaborativeSettings(host_maddrs=("/ip4/127.0.0.1/tcp/0",), initial_peers=PEER_A, matchmaking_time=2)
    assert settings.host_maddrs == ["/ip4/127.0.0.1/tcp/0"]
    assert settings.initial_peers == [PEER_A]
    assert settings.matchmaking_time == 2.0 and isinstance(settings.matchmaking_time, float)


def test_non_setting_env_vars_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings_module, "NON_SETTING_ENV_VARS", frozenset({"COLLAB_LAUNCHER_PID"}))
    assert CollaborativeSettings.from_env({"COLLAB_LAUNCHER_PID": "123"}) == CollaborativeSettings()


def test_unrelated_env_vars_are_ignored() -> None:
    assert CollaborativeSettings.from_env({"PATH": "/bin", "COLLABORATE": "x"}) == CollaborativeSettings()


# ---------------------------------------------------------------------- bad input: Python arguments


@pytest.mark.parametrize(
    ("kwargs", "setting", "fragments"), BAD_PYTHON_VALUES, ids=[str(row[0])[:60] for row in BAD_PYTHON_VALUES]
)
def test_bad_python_values(kwargs: dict[str, Any], setting: str, fragments: tuple[str, ...]) -> None:
    with pytest.raises(CollaborativeConfigError) as info:
        CollaborativeSettings(**kwargs)
    assert info.value.setting == setting
    assert info.value.source is None
    assert_mentions(info.value, *fragments)
    # resolve() reports problems with explicit arguments the same way
    with pytest.raises(CollaborativeConfigError) as info:
        CollaborativeSettings.resolve(env={}, **kwargs)
    assert info.value.setting == setting
    assert_mentions(info.value, *fragments)


def test_unknown_explicit_argument() -> None:
    with pytest.raises(CollaborativeConfigError) as info:
        CollaborativeSettings.resolve(env={}, target_batchsize=5)
    assert_mentions(info.value, "'target_batchsize'", "Did you mean 'target_batch_size'?", "valid settings are")


# ---------------------------------------------------------------------- bad input: environment


@pytest.mark.parametrize(
    ("env", "setting", "fragments"), BAD_ENV_VALUES, ids=[next(iter(r[0])) for r in BAD_ENV_VALUES]
)
def test_bad_env_values(env: dict[str, str], setting: str, fragments: tuple[str, ...]) -> None:
    with pytest.raises(CollaborativeConfigError) as info:
        CollaborativeSettings.from_env(env)
    assert info.value.setting == setting
    assert info.value.source is not None and info.value.source.startswith("environment variable COLLAB_")
    assert_mentions(info.value, *fragments)


def test_explicit_value_hides_bad_env_values() -> None:
    # the explicit argument wins, so the environment's bad range value is never validated
    settings = CollaborativeSettings.resolve(env={"COLLAB_TARGET_BATCH_SIZE": "0"}, target_batch_size=8)
    assert settings.target_batch_size == 8
    # ... nor is an unparsable one
    settings = CollaborativeSettings.resolve(env={"COLLAB_VERBOSE": "maybe"}, verbose=True)
    assert settings.verbose is True
    # but an explicit None does not hide it
    with pytest.raises(CollaborativeConfigError, match="COLLAB_VERBOSE"):
        CollaborativeSettings.resolve(env={"COLLAB_VERBOSE": "maybe"}, verbose=None)


# ---------------------------------------------------------------------- bad input: YAML


@pytest.mark.parametrize(("text", "setting", "fragments"), BAD_YAML_VALUES, ids=[r[0][:30] for r in BAD_YAML_VALUES])
def test_bad_yaml_values(tmp_path: Path, text: str, setting: str | None, fragments: tuple[str, ...]) -> None:
    path = write_yaml(tmp_path, text)
    with pytest.raises(CollaborativeConfigError) as info:
        CollaborativeSettings.from_yaml(path, env={})
    assert info.value.setting == setting
    assert info.value.source == f"YAML file {path}"
    assert_mentions(info.value, str(path), *fragments)


def test_missing_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    with pytest.raises(CollaborativeConfigError) as info:
        CollaborativeSettings.from_yaml(path, env={})
    assert_mentions(info.value, str(path), "check the path")


def test_env_overrides_bad_yaml_value(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "target_batch_size: -5\n")
    settings = CollaborativeSettings.from_yaml(path, env={"COLLAB_TARGET_BATCH_SIZE": "10"})
    assert settings.target_batch_size == 10
