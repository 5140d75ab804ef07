"""The collaborative Lightning Fabric strategy, written once for both Fabric namespaces.

``lightning.fabric`` (package ``lightning``) and ``lightning_fabric`` (package ``lightning-fabric``) ship separate
``Strategy`` classes and registries, like the two Trainer namespaces (see :mod:`lightning_collab.strategy`). Each has
one concrete class (:mod:`lightning_collab.fabric`, :mod:`lightning_collab.fabric_standalone`): this mixin on top of
that namespace's ``SingleDeviceStrategy``.

The strategy only translates Fabric's calls; every collaborative decision is made by the collaborative optimizer
that :func:`collab_core.join.join` builds:

* ``fabric.setup(model, optimizer[, scheduler=...])`` joins the collaboration (DHT, the optimizer of the
  ``algorithm`` setting, join hint) and hands Fabric the collaborative optimizer, which Fabric wraps as usual; the
  scheduler Fabric returns is a stand-in whose ``step()`` does nothing (the collaboration steps the real one once per
  collaborative step).
* ``optimizer.step(batch_size=n)`` reports ``n`` samples (default: the ``batch_size`` setting) and updates the model
  only when the collaboration reached ``target_batch_size``.
* ``fabric.save``/``fabric.load`` store and restore the collaborative optimizer's ``state_dict`` (optimizer and
  scheduler state, collaborative step, fingerprint) under the optimizer's key.
* ``fabric.strategy.shutdown()`` leaves the collaboration (also run at interpreter exit and by ``teardown``).
"""

from __future__ import annotations

import atexit
import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from collab_core import CollaborativeOptimizer, CollaborativeSettings
from collab_core.join import Membership, join
from collab_core.log import get_logger
from collab_core.scheduler import SchedulerDrivenByCollaboration, check_collaborative_scheduler

if TYPE_CHECKING:
    from lightning.fabric.strategies import SingleDeviceStrategy as _TypedStrategyBase
else:
    _TypedStrategyBase = object

logger = get_logger(__name__)

STRATEGY_NAME = "collaborative"
STRATEGY_DESCRIPTION = "Collaborative training over the internet with hivemind (collab-training), for Fabric"

#: said once, at setup, when a scheduler is handed to the Fabric strategy
SCHEDULER_WARNING = (
    "Fabric(strategy='collaborative'): the learning-rate scheduler ({scheduler}) is stepped by the collaboration, once "
    "per collaborative step; the scheduler fabric.setup returned ignores step(). A collaboration has no shared epoch: "
    "a schedule counted in epochs (or in your loop's iterations) runs at the pace of collaborative steps instead. "
    "Count the schedule in collaborative steps (e.g. LambdaLR(optimizer, lambda step: ...) with step = "
    "fabric.strategy.collaborative_step)."
)


@dataclass(frozen=True)
class FabricNamespace:
    """The objects of one Fabric namespace (``lightning.fabric`` or ``lightning_fabric``) the strategy uses."""

    name: str
    SingleDeviceStrategy: type
    STRATEGY_REGISTRY: Any
    MixedPrecision: type
    FabricOptimizer: type

    @classmethod
    def load(cls, name: str) -> FabricNamespace:
        """Import the pieces of namespace ``name`` (raises ImportError when it is not installed)."""

        def module(path: str) -> ModuleType:
            return importlib.import_module(f"{name}.{path}")

        strategies = module("strategies")
        return cls(
            name=name,
            SingleDeviceStrategy=strategies.SingleDeviceStrategy,
            STRATEGY_REGISTRY=strategies.STRATEGY_REGISTRY,
            MixedPrecision=module("plugins.precision").MixedPrecision,
            FabricOptimizer=module("wrappers")._FabricOptimizer,
        )

    def register(self, strategy: type) -> None:
        """Register ``strategy`` as ``"collaborative"`` and let ``optimizer.step(batch_size=...)`` reach it."""
        if STRATEGY_NAME not in self.STRATEGY_REGISTRY:
            self.STRATEGY_REGISTRY.register(STRATEGY_NAME, strategy, description=STRATEGY_DESCRIPTION)
        _forward_step_arguments(self.FabricOptimizer)


def _forward_step_arguments(fabric_optimizer: Any) -> None:
    """WORKAROUND (lightning 2.6, ``_FabricOptimizer.step(closure=None)``): Fabric's optimizer wrapper accepts no
    argument but the closure, so ``optimizer.step(batch_size=n)`` would raise TypeError before reaching the strategy.
    The wrapper's ``step`` is replaced by one that passes further keyword arguments to a collaborative strategy's
    ``optimizer_step``; for every other strategy it is Fabric's own ``step``, unchanged. Idempotent."""
    original = fabric_optimizer.step
    if getattr(original, "_collab_forwards_arguments", False):
        return

    @functools.wraps(original)
    def step(self: Any, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        if not kwargs or not isinstance(self._strategy, CollaborativeFabricStrategyMixin):
            return original(self, closure, **kwargs) if kwargs else original(self, closure)
        if closure is not None:
            kwargs["closure"] = closure
        output = self._strategy.optimizer_step(self.optimizer, **kwargs)
        for callback in self._callbacks:
            hook = getattr(callback, "on_after_optimizer_step", None)
            if callable(hook):
                hook(strategy=self._strategy, optimizer=self.optimizer)
        return output

    step._collab_forwards_arguments = True  # type: ignore[attr-defined]
    fabric_optimizer.step = step


class CollaborativeFabricStrategyMixin(_TypedStrategyBase):
    """Fabric strategy logic shared by both Fabric namespaces; use
    ``lightning_collab.fabric.CollaborativeFabricStrategy`` (for ``lightning.fabric``) or
    ``lightning_collab.fabric_standalone.CollaborativeFabricStrategy`` (for ``lightning_fabric``)."""

    strategy_name = STRATEGY_NAME
    _fabric: ClassVar[FabricNamespace]

    def __init__(self, config: str | None = None, device: str | torch.device | None = None, **settings: Any) -> None:
        """Train as one peer of a collaboration.

        Args:
            config: Optional flat YAML file of settings (the ``collab.yaml`` format).
            device: Torch device of this peer (default: Fabric's ``accelerator``/``devices``).
            **settings: Any :class:`collab_core.CollaborativeSettings` field, e.g. ``target_batch_size=4096``,
                ``run_id="my-run"``, ``batch_size=32``, ``algorithm="diloco"``. A setting left out (or None) comes
                from its ``COLLAB_*`` environment variable, else from ``config``, else from its default.

        Raises:
            collab_core.CollaborativeConfigError: (a ``ValueError``) for an unknown setting or an invalid value; the
                message names the setting, where it came from and the fix.
        """
        #: the resolved, validated settings of this peer
        self.settings = CollaborativeSettings.resolve(yaml_path=config, **settings)
        super().__init__(device=device or "cpu")  # SingleDeviceStrategy, next in the MRO
        self._device_given = self._device_known = device is not None
        self.dht: Any = None
        self.join_hint: str | None = None
        self.collaborative_optimizer: CollaborativeOptimizer | None = None
        self._membership: Membership | None = None

    # ------------------------------------------------------------------ what users read

    @property
    def collaborative_step(self) -> int:
        """Collaborative steps (real optimizer updates) this peer has taken; 0 before ``fabric.setup``."""
        return self.collaborative_optimizer.local_step if self.collaborative_optimizer is not None else 0

    @property
    def num_peers(self) -> int:
        """Peers in the collaboration, this one included (last view); 0 before ``fabric.setup``."""
        if self.collaborative_optimizer is None:
            return 0
        return self.collaborative_optimizer.collaboration_state.num_peers

    def wait_for_peers(self, num_peers: int, timeout: float = 300.0) -> int:
        """Block until the collaboration has ``num_peers`` peers (this one included); call it after ``fabric.setup``.
        Returns the number seen; raises ``TimeoutError`` after ``timeout`` seconds."""
        if self.collaborative_optimizer is None:
            raise RuntimeError("wait_for_peers() works after fabric.setup(model, optimizer)")
        return self.collaborative_optimizer.wait_for_peers(num_peers, timeout)

    # ------------------------------------------------------------------ devices

    @property
    def parallel_devices(self) -> list[torch.device]:
        """This peer's one device; empty until Fabric's connector sets it from ``accelerator``/``devices``."""
        return [self.root_device] if self._device_known else []

    @parallel_devices.setter
    def parallel_devices(self, devices: list[torch.device] | None) -> None:
        if not devices:
            return
        if len(devices) > 1:
            raise ValueError(
                f"Fabric(strategy='collaborative') trains on one device per peer, but Fabric was given {len(devices)} "
                "devices. Set Fabric(devices=1); to use several GPUs of one machine, start one peer per GPU."
            )
        if not self._device_given:
            self._root_device = devices[0]
        self._device_known = True

    # ------------------------------------------------------------------ setup

    def setup_module_and_optimizers(
        self, module: torch.nn.Module, optimizers: list[torch.optim.Optimizer], scheduler: Any | None = None
    ) -> tuple[torch.nn.Module, list[torch.optim.Optimizer], Any | None]:
        """Join the collaboration with the one optimizer (and scheduler) of ``fabric.setup``."""
        if len(optimizers) != 1:
            raise ValueError(
                f"Fabric(strategy='collaborative') supports exactly one optimizer, but fabric.setup got "
                f"{len(optimizers)}. Pass a single optimizer (put several parameter groups in it if needed)."
            )
        module = self.setup_module(module)
        collaborative = self._join(optimizers[0], scheduler)
        standin = SchedulerDrivenByCollaboration(scheduler) if scheduler is not None else None
        return module, [collaborative], standin

    def setup_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """``fabric.setup_optimizers(optimizer)``: join the collaboration (without a scheduler)."""
        return self._join(optimizer, None)

    def _join(self, optimizer: torch.optim.Optimizer, scheduler: Any | None) -> CollaborativeOptimizer:
        if self._membership is not None:
            raise ValueError(
                "Fabric(strategy='collaborative') is one peer with one optimizer, and it already joined with one. "
                "Call fabric.setup(model, optimizer) once; create a new Fabric for another run."
            )
        scaler = getattr(self.precision, "scaler", None)
        if isinstance(self.precision, self._fabric.MixedPrecision) and scaler is not None:
            raise ValueError(
                "Fabric(strategy='collaborative') does not support precision='16-mixed' (its gradient scaler would "
                "unscale and step at every micro-batch). Use precision='bf16-mixed' or '32-true'."
            )
        try:
            check_collaborative_scheduler(scheduler, optimizer)
        except ValueError as error:
            raise ValueError(f"Fabric(strategy='collaborative'): {error}") from None
        if scheduler is not None:
            logger.warning(SCHEDULER_WARNING.format(scheduler=type(scheduler).__name__))
        membership = join(optimizer, self.settings, scheduler=scheduler, print_hint=False)
        self._membership, self.dht, self.join_hint = membership, membership.dht, membership.join_hint
        self.collaborative_optimizer = membership.optimizer
        atexit.register(self.shutdown)
        banner = "=" * 78
        print(f"{banner}\n[collaborative] run {self.settings.run_id!r}: {self.join_hint}\n{banner}", flush=True)
        return membership.optimizer

    # ------------------------------------------------------------------ training

    def optimizer_step(self, optimizer: Any, **kwargs: Any) -> Any:
        """``optimizer.step([closure], batch_size=n)``: report ``n`` samples (default: the ``batch_size`` setting)."""
        if optimizer is not self.collaborative_optimizer:
            return super().optimizer_step(optimizer, **kwargs)
        if kwargs.get("batch_size") is None and self.settings.batch_size is None:
            raise ValueError(
                "Fabric(strategy='collaborative') needs the samples of each micro-batch: call "
                "optimizer.step(batch_size=len(batch)), or set batch_size (CollaborativeFabricStrategy(batch_size=...) "
                "or COLLAB_BATCH_SIZE) when every micro-batch has the same size."
            )
        # the precision plugin calls optimizer.step(**kwargs)
        return super().optimizer_step(optimizer, **kwargs)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ leaving

    def shutdown(self) -> None:
        """Leave the collaboration (averager, DHT). Idempotent; ``fabric.save`` keeps working afterwards."""
        if self._membership is not None:
            membership, self._membership, self.dht = self._membership, None, None
            membership.close()

    def teardown(self) -> None:
        """Leave the collaboration, then Fabric's own teardown."""
        self.shutdown()
        super().teardown()


__all__ = ["SCHEDULER_WARNING", "STRATEGY_NAME", "CollaborativeFabricStrategyMixin", "FabricNamespace"]
