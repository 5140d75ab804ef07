"""Configuring the collaborative strategy: names, arguments, environment, and the errors for what it cannot do.

Everything here fails before a DHT would start (the strategy starts it in ``setup`` after checking the
configuration), so these Trainers run in the test process; training runs are in ``test_strategy_runs.py``.
"""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch

import lightning_collab
from collab_core import CollaborativeConfigError
from collab_core.settings import field_names

NAMESPACES = {
    "pytorch_lightning": lightning_collab.CollaborativeStrategy,
    "lightning.pytorch": lightning_collab.LightningCollaborativeStrategy,
}


@pytest.fixture(params=list(NAMESPACES), ids=["pytorch_lightning", "lightning.pytorch"])
def namespace(request):
    return importlib.import_module(request.param), NAMESPACES[request.param]


@pytest.fixture(autouse=True)
def no_collab_environment(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("COLLAB_"):
            monkeypatch.delenv(name)


def _boring_model(L, configure_optimizers=None):
    from_demos = importlib.import_module(L.__name__ + ".demos.boring_classes")

    class Model(from_demos.BoringModel):
        pass

    if configure_optimizers is not None:
        Model.configure_optimizers = configure_optimizers
    return Model()


def _trainer(L, **kwargs):
    defaults = dict(
        accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    return L.Trainer(**{**defaults, **kwargs})


# ----------------------------------------------------------------------------------------- names and arguments


def test_both_namespaces_register_the_name_to_their_own_class(namespace):
    L, cls = namespace
    assert "collaborative" in L.strategies.StrategyRegistry
    trainer = _trainer(L, strategy="collaborative")
    assert type(trainer.strategy) is cls
    assert isinstance(trainer.strategy, L.strategies.Strategy)


def test_lightning_namespace_class_is_also_under_lightning_collab_lightning():
    from lightning_collab.lightning import CollaborativeStrategy

    assert CollaborativeStrategy is lightning_collab.LightningCollaborativeStrategy


def test_every_setting_is_a_typed_documented_init_argument(namespace):
    _L, cls = namespace
    parameters = inspect.signature(cls.__init__).parameters
    docstring = inspect.getdoc(cls.__init__)
    for name in field_names():
        assert name in parameters, f"{name} is not an argument of {cls.__name__}"
        assert parameters[name].default is None, f"{name}: None must mean 'from COLLAB_* or the default'"
        assert parameters[name].annotation is not inspect.Parameter.empty
        assert f"\n    {name}: " in docstring, f"{name} is not documented in the Args section"
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()), "LightningCLI needs no **kw"


def test_strategy_name_typo_is_an_error_naming_it(namespace):
    # Lightning validates the name itself (before any strategy code runs); its message names the typo and points to
    # the list of strategies, but cannot suggest "collaborative" (README, "Train with Lightning")
    L, _cls = namespace
    with pytest.raises(ValueError, match="invalid strategy name: `strategy='colaborative'`"):
        _trainer(L, strategy="colaborative")


# ----------------------------------------------------------------------------------------- settings sources


def test_environment_configures_a_strategy_given_by_name(namespace, monkeypatch):
    L, _cls = namespace
    monkeypatch.setenv("COLLAB_TARGET_BATCH_SIZE", "123")
    monkeypatch.setenv("COLLAB_CLIENT_MODE", "true")
    monkeypatch.setenv("COLLAB_RUN_ID", "from-env")
    settings = _trainer(L, strategy="collaborative").strategy.settings
    assert (settings.target_batch_size, settings.client_mode, settings.run_id) == (123, True, "from-env")


def test_explicit_arguments_override_the_environment(namespace, monkeypatch):
    _L, cls = namespace
    monkeypatch.setenv("COLLAB_TARGET_BATCH_SIZE", "123")
    strategy = cls(target_batch_size=64, client_mode=True, reuse_grad_buffers=True)
    assert strategy.settings.target_batch_size == 64
    assert strategy.settings.client_mode and strategy.settings.reuse_grad_buffers


def test_construction_has_no_side_effects(namespace):
    _L, cls = namespace
    strategy = cls(target_batch_size=64)
    assert strategy.dht is None and strategy.collaborative_optimizer is None
    assert strategy.collaborative_step == 0 and strategy.num_peers == 0


def test_invalid_argument_names_the_setting(namespace):
    _L, cls = namespace
    with pytest.raises(CollaborativeConfigError, match="target_batch_size"):
        cls(target_batch_size=0)
    with pytest.raises(CollaborativeConfigError, match="initial_peers"):
        cls(initial_peers=["not-a-multiaddr"])


def test_invalid_environment_variable_names_the_variable(namespace, monkeypatch):
    L, _cls = namespace
    monkeypatch.setenv("COLLAB_CLIENT_MODE", "maybe")
    with pytest.raises(CollaborativeConfigError, match="COLLAB_CLIENT_MODE"):
        _trainer(L, strategy="collaborative")


# ----------------------------------------------------------------------------------------- unsupported setups


def _fit_error(L, model, **trainer_kwargs) -> str:
    trainer = _trainer(L, **trainer_kwargs)
    with pytest.raises((ValueError, L.utilities.exceptions.MisconfigurationException)) as error:
        trainer.fit(model)
    assert trainer.strategy.dht is None, "the check must come before the DHT starts"
    return str(error.value)


def test_several_optimizers_are_refused(namespace):
    L, cls = namespace

    def two_optimizers(self):
        return [torch.optim.SGD(self.parameters(), lr=0.1), torch.optim.SGD(self.parameters(), lr=0.1)]

    model = _boring_model(L, two_optimizers)
    model.automatic_optimization = False
    message = _fit_error(L, model, strategy=cls(target_batch_size=8))
    assert "exactly one optimizer" in message and "parameter groups" in message


def test_reduce_lr_on_plateau_is_refused(namespace):
    L, cls = namespace

    def plateau(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "monitor": "train_loss"}}

    message = _fit_error(L, _boring_model(L, plateau), strategy=cls(target_batch_size=8))
    assert "ReduceLROnPlateau" in message and "LambdaLR" in message


def test_gradient_clipping_with_reused_buffers_is_refused(namespace):
    L, cls = namespace
    strategy = cls(target_batch_size=8, reuse_grad_buffers=True)
    message = _fit_error(L, _boring_model(L), strategy=strategy, gradient_clip_val=1.0)
    assert "reuse_grad_buffers" in message and "gradient_clip_val" in message


def test_gradient_clipping_with_fp16_is_refused(namespace):
    L, cls = namespace
    precision = importlib.import_module(L.__name__ + ".plugins.precision")
    plugin = precision.MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    message = _fit_error(
        L, _boring_model(L), strategy=cls(target_batch_size=8), plugins=[plugin], gradient_clip_val=1.0
    )
    assert "16-mixed" in message and "bf16-mixed" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a CPU-only machine gives")
def test_gpu_only_precision_on_cpu_is_refused(namespace):
    L, cls = namespace
    precision = importlib.import_module(L.__name__ + ".plugins.precision")
    plugin = precision.MixedPrecision("16-mixed", "cuda", scaler=None)
    message = _fit_error(L, _boring_model(L), strategy=cls(target_batch_size=8), plugins=[plugin])
    assert "cuda" in message and "bf16-mixed" in message


def test_trainer_device_flags_reach_the_strategy(namespace):
    L, cls = namespace
    trainer = _trainer(L, strategy=cls(target_batch_size=8))
    assert trainer.strategy.root_device == torch.device("cpu") and trainer.num_devices == 1


@pytest.mark.parametrize("by_name", [False, True], ids=["instance", "name"])
def test_several_devices_make_one_peer_of_ddp_processes(namespace, by_name, monkeypatch):
    """devices=2: the strategy Lightning built (from the name or the instance) becomes this namespace's DDP-based
    multi-device strategy, with Lightning's subprocess launcher; the settings stay as they were resolved."""
    L, cls = namespace
    monkeypatch.setenv("COLLAB_TARGET_BATCH_SIZE", "24")
    trainer = _trainer(L, strategy="collaborative" if by_name else cls(run_id="duo"), devices=2)
    strategy = trainer.strategy
    multi_device_class = importlib.import_module(cls.__module__).CollaborativeMultiDeviceStrategy
    assert type(strategy) is multi_device_class and isinstance(strategy, L.strategies.DDPStrategy)
    assert strategy.num_processes == 2 and strategy.world_size == 2 and strategy.root_device == torch.device("cpu")
    assert type(strategy.launcher).__name__ == "_SubprocessScriptLauncher"
    assert strategy.settings.target_batch_size == 24
    assert strategy.settings.run_id == ("collab" if by_name else "duo")
    assert strategy.collaborative_step == 0 and strategy.dht is None  # nothing starts before fit


def test_one_device_stays_the_single_device_strategy(namespace):
    L, cls = namespace
    strategy = _trainer(L, strategy=cls(target_batch_size=8), devices=1).strategy
    assert type(strategy) is cls and not isinstance(strategy, L.strategies.DDPStrategy)


def test_an_explicit_device_is_one_process_whatever_the_trainer_devices(namespace):
    """As with Lightning's own strategies, devices known to the strategy win over the Trainer's flag."""
    L, cls = namespace
    trainer = _trainer(L, strategy=cls(target_batch_size=8, device="cpu"), devices=2)
    assert type(trainer.strategy) is cls and trainer.num_devices == 1


def test_several_nodes_per_peer_are_refused(namespace):
    L, cls = namespace
    with pytest.raises(L.utilities.exceptions.MisconfigurationException, match="one peer per machine"):
        _trainer(L, strategy=cls(target_batch_size=8), devices=2, num_nodes=2)
