"""Configuring ``Fabric(strategy="collaborative")``: the name, the settings, and the errors for what it cannot do.

Everything here fails (or finishes) before a DHT would start: the strategy joins in ``fabric.setup`` after checking
what it was given, so these Fabrics run in the test process. Training runs are in ``test_fabric_runs.py``.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import lightning_collab
from collab_core import CollaborativeConfigError


@pytest.fixture(autouse=True)
def no_collab_environment(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("COLLAB_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize("namespace", ["lightning.fabric", "lightning_fabric"])
def test_collaborative_is_a_fabric_strategy_name_once_lightning_collab_is_imported(namespace):
    fabric_module = importlib.import_module(namespace)
    ours = importlib.import_module(
        "lightning_collab.fabric" if namespace == "lightning.fabric" else "lightning_collab.fabric_standalone"
    ).CollaborativeFabricStrategy
    assert "collaborative" in importlib.import_module(f"{namespace}.strategies").STRATEGY_REGISTRY
    fabric = fabric_module.Fabric(strategy="collaborative", accelerator="cpu", devices=1)
    assert type(fabric.strategy) is ours
    assert isinstance(fabric.strategy, importlib.import_module(f"{namespace}.strategies").Strategy)
    assert fabric.strategy.collaborative_step == 0 and fabric.strategy.dht is None  # nothing started yet


def test_settings_come_from_arguments_over_environment(monkeypatch):
    monkeypatch.setenv("COLLAB_TARGET_BATCH_SIZE", "64")
    monkeypatch.setenv("COLLAB_RUN_ID", "from-env")
    strategy = lightning_collab.CollaborativeFabricStrategy(run_id="explicit", algorithm="diloco")
    assert strategy.settings.target_batch_size == 64
    assert strategy.settings.run_id == "explicit" and strategy.settings.algorithm == "diloco"


def test_unknown_setting_is_named_with_a_suggestion():
    with pytest.raises(CollaborativeConfigError, match="target_batch_size"):
        lightning_collab.CollaborativeFabricStrategy(target_batchsize=10)


def test_several_devices_are_refused_with_the_fix():
    from lightning.fabric import Fabric

    with pytest.raises(ValueError, match=r"one device per peer.*devices=1"):
        Fabric(strategy="collaborative", accelerator="cpu", devices=2)


def _model_and_optimizer():
    model = torch.nn.Linear(2, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_two_optimizers_are_refused_before_joining():
    from lightning.fabric import Fabric

    fabric = Fabric(strategy="collaborative", accelerator="cpu", devices=1)
    model, opt = _model_and_optimizer()
    with pytest.raises(ValueError, match="exactly one optimizer"):
        fabric.setup(model, opt, torch.optim.SGD(model.parameters(), lr=0.1))
    assert fabric.strategy.dht is None


def test_plateau_scheduler_is_refused_before_joining():
    from lightning.fabric import Fabric

    fabric = Fabric(strategy="collaborative", accelerator="cpu", devices=1)
    model, opt = _model_and_optimizer()
    with pytest.raises(ValueError, match="ReduceLROnPlateau is not supported"):
        fabric.setup(model, opt, scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau(opt))
    assert fabric.strategy.dht is None


def test_fp16_is_refused_with_the_fix():
    from lightning.fabric import Fabric
    from lightning.fabric.plugins.precision import MixedPrecision

    precision = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    fabric = Fabric(strategy="collaborative", accelerator="cpu", devices=1, plugins=[precision])
    with pytest.raises(ValueError, match="bf16-mixed"):
        fabric.setup(*_model_and_optimizer())
    assert fabric.strategy.dht is None


def test_other_strategies_keep_fabrics_own_optimizer_step():
    """The workaround that lets ``optimizer.step(batch_size=...)`` reach our strategy leaves other strategies be."""
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1)
    model, optimizer = fabric.setup(*_model_and_optimizer())
    fabric.backward(model(torch.ones(1, 2)).sum())
    before = model.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(before, model.weight)
    with pytest.raises(TypeError, match="batch_size"):
        optimizer.step(batch_size=1)
