"""The settings schema and the optimizer declare the same defaults (they are written twice: keep them in step).

``CollaborativeSettings`` (what YAML, ``COLLAB_*`` variables and the integrations start from) and the keyword
defaults of ``CollaborativeOptimizer.__init__`` (what code that builds the optimizer directly gets) must agree, or a
Lightning/Accelerate peer and a plain-PyTorch peer of the same run would behave differently with "the defaults".
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterator
from typing import Any

import hivemind
import pytest
import torch
from hivemind.averaging import DecentralizedAverager

from collab_core import DEFAULT_AVERAGING_TIMEOUT, CollaborativeOptimizer, CollaborativeSettings, DiLoCoOptimizer

# settings whose optimizer argument has another name (``optimizer_kwargs()`` does the renaming)
ARGUMENT_NAMES = {"run_id": "prefix", "batch_size": "batch_size_per_step"}
# settings that are not optimizer arguments: they configure the DHT (start_dht) or choose the optimizer class
NOT_OPTIMIZER_ARGUMENTS = {
    "initial_peers",
    "host_maddrs",
    "announce_maddrs",
    "identity_path",
    "use_ipfs",
    "algorithm",  # chooses the optimizer class (collab_core.join)
    "average_opt_statistics",
    "outer_lr",  # DiLoCoOptimizer only (CollaborativeSettings.outer_kwargs; checked below)
    "outer_momentum",
    "outer_nesterov",
}
# the outer-optimizer settings and DiLoCoOptimizer's argument names
OUTER_ARGUMENTS = {"outer_lr": "outer_lr", "outer_momentum": "outer_momentum", "outer_nesterov": "nesterov"}
# optimizer arguments without a default: every caller passes them
REQUIRED = {"prefix", "target_batch_size"}
# the optimizer's default is None, meaning this value
NONE_MEANS = {"averaging_timeout": DEFAULT_AVERAGING_TIMEOUT}
# reach the optimizer through **kwargs (``matchmaking_time``: an alias of hivemind's ``min_matchmaking_time``):
# checked on a built optimizer, or against the averager's own default
THROUGH_KWARGS = {"matchmaking_time", "compression"}


def settings_defaults() -> dict[str, Any]:
    return {
        field.name: getattr(CollaborativeSettings(), field.name) for field in dataclasses.fields(CollaborativeSettings)
    }


def optimizer_defaults() -> dict[str, Any]:
    parameters = inspect.signature(CollaborativeOptimizer.__init__).parameters
    return {name: p.default for name, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def test_every_setting_passed_to_the_optimizer_is_checked() -> None:
    forwarded = set(CollaborativeSettings().optimizer_kwargs())
    expected = {ARGUMENT_NAMES.get(name, name) for name in settings_defaults()} - NOT_OPTIMIZER_ARGUMENTS
    assert forwarded == expected, "a setting was added to or removed from optimizer_kwargs(): update this test"
    assert forwarded - THROUGH_KWARGS <= set(optimizer_defaults()), "an optimizer argument of a setting was renamed"


def test_settings_defaults_equal_the_optimizer_keyword_defaults() -> None:
    arguments = optimizer_defaults()
    compared, disagree = [], {}
    for name, default in settings_defaults().items():
        argument = ARGUMENT_NAMES.get(name, name)
        if name in NOT_OPTIMIZER_ARGUMENTS or argument in REQUIRED | THROUGH_KWARGS:
            continue
        theirs = arguments[argument]
        if theirs is None and argument in NONE_MEANS:
            theirs = NONE_MEANS[argument]
        compared.append(name)
        if not (default == theirs and (default is None) == (theirs is None)):
            disagree[name] = (default, theirs)
    assert not disagree, f"settings default vs CollaborativeOptimizer.__init__ default differ: {disagree}"
    assert len(compared) >= 10, compared


def test_outer_settings_defaults_equal_the_diloco_optimizer_defaults() -> None:
    parameters = inspect.signature(DiLoCoOptimizer.__init__).parameters
    settings = CollaborativeSettings()
    assert settings.outer_kwargs() == {argument: getattr(settings, name) for name, argument in OUTER_ARGUMENTS.items()}
    for name, argument in OUTER_ARGUMENTS.items():
        assert parameters[argument].default == getattr(settings, name), name
    # the networking arguments are CollaborativeOptimizer's own (DiLoCoOptimizer passes **kwargs through)
    assert parameters["batch_size_per_step"].default is None and "kwargs" in parameters


def test_required_optimizer_arguments_have_no_default() -> None:
    arguments = optimizer_defaults()
    assert all(arguments[name] is inspect.Parameter.empty for name in REQUIRED)


def test_default_compression_is_hivemind_averagers_default() -> None:
    averager_default = inspect.signature(DecentralizedAverager.__init__).parameters["compression"].default
    assert type(CollaborativeSettings().make_compression()) is type(averager_default)


@pytest.fixture(scope="module")
def dht() -> Iterator[hivemind.DHT]:
    node = hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    yield node
    node.shutdown()


@pytest.mark.timeout(60)
def test_an_optimizer_built_without_arguments_resolves_the_settings_defaults(dht: hivemind.DHT) -> None:
    """Defaults that the signature does not show (``None`` for a constant, hivemind arguments via ``**kwargs``)."""
    settings = CollaborativeSettings()
    model = torch.nn.Linear(2, 1)
    opt = CollaborativeOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), dht=dht, prefix="defaults", target_batch_size=8
    )
    try:
        assert opt.matchmaking_time == settings.matchmaking_time
        assert opt.averaging_timeout == settings.averaging_timeout
    finally:
        opt.shutdown()
