"""The collaborative Lightning strategy, written once for both Lightning namespaces.

``pytorch_lightning`` and ``lightning.pytorch`` ship separate ``Strategy`` classes and registries (a strategy built on
one fails ``isinstance`` checks in the other), so the package defines one concrete class per namespace
(:mod:`lightning_collab.pl`, :mod:`lightning_collab.lightning`). Both are this mixin on top of that namespace's
``SingleDeviceStrategy``; the few namespace-specific objects the mixin needs come from :class:`LightningNamespace`.

The strategy only translates Lightning's configuration and hooks; every collaborative decision is made by
``collab_core.CollaborativeOptimizer``:

* ``setup`` (when fitting) starts the DHT, wraps the model's optimizer and scheduler in a ``CollaborativeOptimizer``
  and prints the join hint; ``teardown`` leaves the collaboration and stops the DHT. Constructing the strategy only
  resolves and validates the settings (explicit arguments > ``COLLAB_*`` variables > defaults).
* ``on_train_batch_start`` counts the samples of every training batch; ``optimizer_step`` reports them (all batches
  since the last optimizer step, so ``accumulate_grad_batches`` is accounted for) and logs the metrics.
* Lightning still "steps" the scheduler, but what it holds is a stand-in whose ``step`` does nothing: the
  collaborative optimizer steps the real scheduler once per collaborative step.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from typing_extensions import override

from collab_core import CollaborativeOptimizer, CollaborativeSettings
from collab_core.backup import is_backup
from collab_core.join import Membership, join
from collab_core.log import get_logger
from collab_core.metrics import PROGRESS_BAR_METRICS, collaboration_metrics
from collab_core.reporting import CollaborationProgress
from collab_core.scheduler import SchedulerDrivenByCollaboration, check_collaborative_scheduler
from lightning_collab.backup import checkpoint_from_backup

if TYPE_CHECKING:  # for type checkers the mixin is a strategy (both namespaces' strategies have the same API)
    from pytorch_lightning.strategies import SingleDeviceStrategy as _TypedStrategyBase
else:
    _TypedStrategyBase = object

logger = get_logger(__name__)

STRATEGY_NAME = "collaborative"
STRATEGY_DESCRIPTION = "Collaborative training over the internet with hivemind (collab-training)"
#: between the steps the loggers write, refresh the ``collab/*`` metrics for the progress bar this often (seconds)
METRICS_REFRESH_SECONDS = 0.5


@dataclass(frozen=True)
class LightningNamespace:
    """The objects of one Lightning namespace (``pytorch_lightning`` or ``lightning.pytorch``) the strategy uses."""

    name: str
    SingleDeviceStrategy: type
    DDPStrategy: type
    StrategyRegistry: Any
    MisconfigurationException: type[Exception]
    MixedPrecision: type
    TrainerFn: Any
    extract_batch_size: Callable[[Any], int]

    @classmethod
    def load(cls, name: str) -> LightningNamespace:
        """Import the pieces of namespace ``name`` (raises ImportError when it is not installed)."""

        def module(path: str) -> ModuleType:
            return importlib.import_module(f"{name}.{path}")

        strategies = module("strategies")
        return cls(
            name=name,
            SingleDeviceStrategy=strategies.SingleDeviceStrategy,
            DDPStrategy=strategies.DDPStrategy,
            StrategyRegistry=strategies.StrategyRegistry,
            MisconfigurationException=module("utilities.exceptions").MisconfigurationException,
            MixedPrecision=module("plugins.precision").MixedPrecision,
            TrainerFn=module("trainer.states").TrainerFn,
            extract_batch_size=module("utilities.data").extract_batch_size,
        )


#: said once per strategy when Lightning would step the scheduler per epoch (its default ``interval``)
EPOCH_INTERVAL_WARNING = (
    "strategy='collaborative': the learning-rate scheduler ({scheduler}) has interval='epoch' (Lightning's default "
    "for a scheduler returned without a config dict), but a collaboration has no shared epoch: it is stepped once "
    "per collaborative step instead, so a schedule counted in epochs runs far faster (StepLR(step_size=1) divides "
    "the learning rate at every collaborative step). Count the schedule in collaborative steps and return "
    "{{'scheduler': scheduler, 'interval': 'step'}} from configure_optimizers."
)


def _keep_accumulated_gradients() -> None:
    """Replaces ``LightningModule.on_validation_model_zero_grad`` while gradient buffers are reused (see setup)."""


class CollaborativeStrategyMixin(_TypedStrategyBase):
    """Lightning strategy logic shared by both namespaces; use ``lightning_collab.CollaborativeStrategy`` (for
    ``pytorch_lightning``) or ``lightning_collab.LightningCollaborativeStrategy`` (for ``lightning.pytorch``)."""

    strategy_name = STRATEGY_NAME
    _lightning: ClassVar[LightningNamespace]
    #: this namespace's strategy for several local devices, which this one becomes when given several
    _multi_device_class: ClassVar[Any]
    #: set by Lightning's accelerator connector (as on its parallel strategies); used only with several devices
    cluster_environment: Any = None

    def __init__(
        self,
        target_batch_size: int | None = None,
        run_id: str | None = None,
        batch_size: int | None = None,
        initial_peers: list[str] | None = None,
        host_maddrs: list[str] | None = None,
        announce_maddrs: list[str] | None = None,
        client_mode: bool | None = None,
        identity_path: str | None = None,
        use_ipfs: bool | None = None,
        averaging_timeout: float | None = None,
        matchmaking_time: float | None = None,
        min_refresh_period: float | None = None,
        max_refresh_period: float | None = None,
        default_refresh_period: float | None = None,
        metadata_expiration: float | None = None,
        step_tolerance: int | None = None,
        reuse_grad_buffers: bool | None = None,
        accumulate_grads_on: str | None = None,
        algorithm: str | None = None,
        average_opt_statistics: list[str] | None = None,
        outer_lr: float | None = None,
        outer_momentum: float | None = None,
        outer_nesterov: bool | None = None,
        compression: str | None = None,
        verbose: bool | None = None,
        device: str | None = None,
    ) -> None:
        """Train as one peer of a collaboration. Arguments left at ``None`` come from the ``COLLAB_*`` environment
        variable of the same name (e.g. ``COLLAB_INITIAL_PEERS``), else from the default shown.

        Args:
            target_batch_size: Samples all peers accumulate together before each optimizer step (default 4096).
            run_id: Name of the run, shared by all its peers; letters, digits, ``_`` and ``-`` (default "collab").
            batch_size: Samples per training batch of this peer (default: inferred from each batch).
            initial_peers: Multiaddrs (with ``/p2p/<peer id>``) of running peers to join; empty starts a new run.
            host_maddrs: Multiaddrs to listen on (default ``["/ip4/0.0.0.0/tcp/0"]``).
            announce_maddrs: Public multiaddrs announced to other peers, e.g. behind NAT (default: none).
            client_mode: Accept no incoming connections (behind a firewall/NAT); DHT and averaging both run as a
                client, and the peer still contributes its gradients (default False).
            identity_path: Private key file that keeps this peer's id stable across restarts (default: none).
            use_ipfs: Find peers through the public IPFS network (default False).
            averaging_timeout: Seconds after which an unfinished averaging round is abandoned (default 30).
            matchmaking_time: Seconds a forming averaging group waits for expected peers (default 5).
            min_refresh_period: Shortest interval between reads of the collaboration's progress (s, default 0.5).
            max_refresh_period: Longest interval between reads of the collaboration's progress (s, default 30).
            default_refresh_period: Read interval while no other peer is seen (s, default 3).
            metadata_expiration: Seconds this peer's progress record lives in the DHT unless refreshed (default 60).
            step_tolerance: Steps a peer may lag behind before it downloads the state from peers (default 1).
            reuse_grad_buffers: Accumulate gradients in ``param.grad`` to save memory (default False); the strategy
                keeps Lightning from zeroing them mid-accumulation.
            accumulate_grads_on: Device that holds the accumulated gradients, e.g. "cpu" (default: the model's).
            algorithm: Averaging scheme: "gradient" (average gradients, every peer takes the same step),
                "adaptive" (each peer steps, then parameters and ``average_opt_statistics`` are averaged) or
                "diloco" (every optimizer step is a local inner step of the model's optimizer; once per
                ``target_batch_size`` samples the peers average the pseudo-gradient and take an outer Nesterov SGD
                step) (default "gradient").
            average_opt_statistics: With ``algorithm="adaptive"``: optimizer state entries to average with the
                parameters, e.g. ``exp_avg_sq`` (default: none).
            outer_lr: With ``algorithm="diloco"``: learning rate of the outer SGD (default 0.7).
            outer_momentum: With ``algorithm="diloco"``: momentum of the outer SGD, in [0, 1) (default 0.9).
            outer_nesterov: With ``algorithm="diloco"``: Nesterov momentum in the outer SGD (default True).
            compression: Compression of the averaged tensors: none, float16, scaled-float16, uniform8bit,
                quantile8bit (default none).
            verbose: Log collaboration progress at INFO level (default False).
            device: Torch device of this peer, one process (default: the Trainer's ``accelerator``/``devices``; with
                ``devices=N`` the peer is N local processes, one per device).

        Raises:
            collab_core.CollaborativeConfigError: (a ``ValueError``) for an invalid value; the message names the
                setting, where it came from (argument or environment variable) and the fix.
        """
        explicit: dict[str, Any] = dict(
            target_batch_size=target_batch_size,
            run_id=run_id,
            batch_size=batch_size,
            initial_peers=initial_peers,
            host_maddrs=host_maddrs,
            announce_maddrs=announce_maddrs,
            client_mode=client_mode,
            identity_path=identity_path,
            use_ipfs=use_ipfs,
            averaging_timeout=averaging_timeout,
            matchmaking_time=matchmaking_time,
            min_refresh_period=min_refresh_period,
            max_refresh_period=max_refresh_period,
            default_refresh_period=default_refresh_period,
            metadata_expiration=metadata_expiration,
            step_tolerance=step_tolerance,
            reuse_grad_buffers=reuse_grad_buffers,
            accumulate_grads_on=accumulate_grads_on,
            algorithm=algorithm,
            average_opt_statistics=average_opt_statistics,
            outer_lr=outer_lr,
            outer_momentum=outer_momentum,
            outer_nesterov=outer_nesterov,
            compression=compression,
            verbose=verbose,
        )
        #: the resolved, validated settings of this peer
        self.settings = CollaborativeSettings.resolve(**explicit)
        super().__init__(device=device or "cpu")  # SingleDeviceStrategy, next in the MRO
        self._device_given = self._device_known = device is not None
        self.dht: Any = None
        self.join_hint: str | None = None
        self.collaborative_optimizer: CollaborativeOptimizer | None = None
        self._membership: Membership | None = None
        self._epoch_interval_warned = False
        self._grad_scaler: Any = None
        self._pending_samples = 0
        self._metrics_logged_at = float("-inf")
        self._progress: CollaborationProgress | None = None
        self._progress_at = float("-inf")
        self._patched_module: Any = None

    # ------------------------------------------------------------------ what users read

    @property
    def collaborative_step(self) -> int:
        """Collaborative steps (real optimizer updates) this peer has taken; 0 before ``fit``."""
        return self.collaborative_optimizer.local_step if self.collaborative_optimizer is not None else 0

    @property
    def num_peers(self) -> int:
        """Peers in the collaboration, this one included (last view); 0 before ``fit``."""
        if self.collaborative_optimizer is None:
            return 0
        return self.collaborative_optimizer.collaboration_state.num_peers

    def wait_for_peers(self, num_peers: int, timeout: float = 300.0) -> int:
        """Block until the collaboration has ``num_peers`` peers (this one included); call it once fitting started,
        e.g. from ``on_train_start``. Returns the number seen; raises ``TimeoutError`` after ``timeout`` seconds."""
        if self.collaborative_optimizer is None:
            raise RuntimeError("wait_for_peers() works while fitting: call it from on_train_start or later")
        return self.collaborative_optimizer.wait_for_peers(num_peers, timeout)

    # ------------------------------------------------------------------ devices

    @property
    def parallel_devices(self) -> list[torch.device]:
        """This peer's one device. Empty until known: Lightning's accelerator connector then sets it from the
        Trainer's ``accelerator``/``devices`` (a device given to ``__init__`` is known from the start). Given several,
        the strategy becomes the multi-device one (see :mod:`lightning_collab.multi_device`)."""
        return [self.root_device] if self._device_known else []

    @parallel_devices.setter
    def parallel_devices(self, devices: list[torch.device] | None) -> None:
        if not devices:
            return
        if len(devices) > 1:  # (never with a device given to __init__: Lightning keeps a strategy's own devices)
            # N local processes as one peer: Lightning's DDP inside the machine (lightning_collab.multi_device)
            self._multi_device_class.adopt(self, devices)
            return
        if not self._device_given:
            self._root_device = devices[0]
        self._device_known = True

    # ------------------------------------------------------------------ lifecycle

    @override
    def setup(self, trainer: Any) -> None:
        fitting = trainer.state.fn == self._lightning.TrainerFn.FITTING
        if fitting:
            self._check_trainer(trainer)
        super().setup(trainer)  # builds the optimizers and schedulers
        if fitting:
            self._join_collaboration(trainer)

    @override
    def teardown(self) -> None:
        self._leave_collaboration()
        super().teardown()

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's loading, plus swarm backups (``collab monitor --backup-dir``): ``fit(ckpt_path=backup)``
        resumes from one (see :func:`lightning_collab.backup.checkpoint_from_backup`)."""
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        if not is_backup(checkpoint):
            return checkpoint
        module = self.lightning_module
        assert module is not None, "a checkpoint is restored into the LightningModule being fitted"
        version = importlib.import_module(self._lightning.name).__version__
        return checkpoint_from_backup(checkpoint, module.state_dict(), version)

    def _join_collaboration(self, trainer: Any) -> None:
        optimizer = self._single_optimizer()
        scheduler = self._single_scheduler()
        self._grad_scaler = self._fp16_scaler(trainer)
        settings = self.settings
        membership = join(optimizer, settings, scheduler=scheduler, grad_scaler=self._grad_scaler, print_hint=False)
        self._joined(membership)

    def _joined(self, membership: Membership) -> None:
        """This process joined the collaboration (the only one of the peer): train with its optimizer."""
        previous = self.collaborative_optimizer  # from an earlier fit of this Trainer (shut down), or None
        self._membership, self.dht, self.join_hint = membership, membership.dht, membership.join_hint
        collaborative = membership.optimizer
        if previous is not None:
            self._continue_from(previous, collaborative)
        self.collaborative_optimizer = collaborative
        self._prepare_loop(collaborative, announce=True)

    def _prepare_loop(self, optimizer: torch.optim.Optimizer, *, announce: bool) -> None:
        """Hand ``optimizer`` and scheduler stand-ins to Lightning's loop; ``announce``: this process talks to the
        collaboration (it warns, shows progress and prints the join hint)."""
        settings = self.settings
        self.optimizers = [optimizer]
        for config in self.lr_scheduler_configs:
            if announce and config.interval == "epoch" and not self._epoch_interval_warned:
                self._epoch_interval_warned = True
                logger.warning(EPOCH_INTERVAL_WARNING.format(scheduler=type(config.scheduler).__name__))
            config.scheduler = SchedulerDrivenByCollaboration(config.scheduler)  # type: ignore[assignment]
        if settings.reuse_grad_buffers:
            # Lightning's default on_validation_model_zero_grad sets every .grad to None before an in-epoch
            # validation, wiping gradients whose samples are already counted; the accumulator clears them itself.
            self._patched_module = self.lightning_module
            self._patched_module.on_validation_model_zero_grad = _keep_accumulated_gradients
        self._pending_samples = 0
        if not announce:
            return
        # Lightning's progress bar shows the numbers; the console gets a line only when the state changes (peers
        # joined or left, a download, a failed round). With verbose=True the core logs those itself.
        self._progress = CollaborationProgress(
            settings.run_id, periodic=False, level=logging.DEBUG if settings.verbose else logging.INFO
        )
        self._progress_at = float("-inf")
        banner = "=" * 78
        print(f"{banner}\n[collaborative] run {settings.run_id!r}: {self.join_hint}\n{banner}", flush=True)

    def _continue_from(self, previous: CollaborativeOptimizer, collaborative: CollaborativeOptimizer) -> None:
        """A second ``fit`` of the same Trainer: continue at the collaborative step the first one reached, with its
        optimizer and scheduler state (Lightning built fresh ones), as if resuming from a checkpoint taken after the
        first ``fit``. A checkpoint given to this ``fit`` (``ckpt_path``) is restored afterwards and wins."""
        state = previous.state_dict()  # works after shutdown
        try:
            collaborative.load_state_dict(state)
        except (ValueError, KeyError, RuntimeError) as e:
            logger.warning(
                f"strategy='collaborative': this fit cannot continue the optimizer state of the previous fit ({e}); "
                f"it starts at collaborative step 0 instead of {state.get('local_step')}"
            )

    def _leave_collaboration(self) -> None:
        if self._patched_module is not None:
            vars(self._patched_module).pop("on_validation_model_zero_grad", None)
            self._patched_module = None
        if self._membership is not None:
            self._membership.close()  # the optimizer's state_dict still works: save_checkpoint after fit
            self._membership = None
            self.dht = None

    # ------------------------------------------------------------------ training hooks

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        self._pending_samples += self._samples_in(batch)

    @override
    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        collaborative = self.collaborative_optimizer
        inner = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer in manual optimization
        if collaborative is None or inner is not collaborative:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        samples = self._take_pending_samples()
        model = model or self.lightning_module
        if self._grad_scaler is None:
            output = self.precision_plugin.optimizer_step(
                collaborative,  # type: ignore[arg-type]  # it is a torch Optimizer; its step takes batch_size first
                model=model,
                closure=closure,
                batch_size=samples,
                **kwargs,
            )
        else:
            # fp16: Lightning's MixedPrecision would unscale, check and update the scale at every call, i.e. per
            # micro-batch; the collaborative optimizer does all three once per collaborative step.
            output = closure()
            # Lightning's on_before_optimizer_step hooks (a protected Precision method; clipping is refused with fp16)
            self.precision_plugin._after_closure(model, collaborative)  # type: ignore[arg-type]
            collaborative.record_loss(output)  # (the other path's closure runs inside step(), which records it)
            collaborative.step(batch_size=samples)
        self._log_metrics()
        return output

    def _take_pending_samples(self) -> int:
        """This process's samples since the last optimizer step (all batches of the accumulation)."""
        samples, self._pending_samples = self._pending_samples, 0
        if samples <= 0:
            raise self._lightning.MisconfigurationException(
                "strategy='collaborative': optimizer.step() was called twice for the same training batch. With "
                "manual optimization, call opt.step() at most once per training batch (after manual_backward)."
            )
        return samples

    def _log_metrics(self) -> None:
        module = self.lightning_module
        collaborative = self.collaborative_optimizer
        if module is None or collaborative is None:
            return
        now = time.monotonic()
        if self._progress is not None and now - self._progress_at >= METRICS_REFRESH_SECONDS:
            self._progress_at = now
            self._progress.update(collaborative.collaboration_state, now)  # smoothed numbers; state-change lines
        if not self._metrics_due(module.trainer):
            return
        self._metrics_logged_at = now
        progress = self._progress.latest if self._progress is not None else None
        for name, value in collaboration_metrics(collaborative, progress).items():
            module.log(name, value, on_step=True, on_epoch=False, prog_bar=name in PROGRESS_BAR_METRICS, batch_size=1)

    def _metrics_due(self, trainer: Any) -> bool:
        """Whether to log the ``collab/*`` metrics at this optimizer step.

        ``LightningModule.log`` costs about half a millisecond per call, several per optimizer step: as much as the
        collaborative optimizer's own work per micro-batch. So the metrics are logged on the steps whose metrics
        the loggers write (``log_every_n_steps``) and, for the progress bar, at most every
        ``METRICS_REFRESH_SECONDS``.
        """
        connector = getattr(trainer, "_logger_connector", None)
        if connector is None or getattr(connector, "should_update_logs", True):
            return True
        if getattr(trainer, "progress_bar_callback", None) is None:
            return False
        return time.monotonic() - self._metrics_logged_at >= METRICS_REFRESH_SECONDS

    def _samples_in(self, batch: Any) -> int:
        if self.settings.batch_size is not None:
            return self.settings.batch_size
        try:
            return int(self._lightning.extract_batch_size(batch))
        except Exception as e:
            raise self._lightning.MisconfigurationException(
                "strategy='collaborative' could not infer the number of samples in a training batch "
                f"({e}). Set it explicitly: CollaborativeStrategy(batch_size=...) or COLLAB_BATCH_SIZE."
            ) from e

    # ------------------------------------------------------------------ validation of the configuration

    def _check_trainer(self, trainer: Any) -> None:
        exception = self._lightning.MisconfigurationException
        clip = trainer.gradient_clip_val
        if clip and self.settings.reuse_grad_buffers:
            raise exception(
                "gradient_clip_val cannot be combined with reuse_grad_buffers=True: param.grad then holds the sum of "
                "all micro-batches of the collaborative step, and clipping it at every optimizer step would clip the "
                "accumulation. Remove gradient_clip_val or set reuse_grad_buffers=False."
            )
        if clip and self._fp16_scaler(trainer) is not None:
            raise exception(
                "gradient_clip_val cannot be combined with precision='16-mixed' under strategy='collaborative': the "
                "gradients stay scaled until the collaborative step. Use precision='bf16-mixed' or remove clipping."
            )
        plugin = self.precision_plugin
        device = getattr(plugin, "device", None)
        if isinstance(plugin, self._lightning.MixedPrecision) and device is not None:
            if torch.device(device).type != self.root_device.type:
                raise exception(
                    f"The precision plugin runs on {device!r}, but this peer trains on {self.root_device} "
                    f"(a GPU-only setting on a CPU machine?). Use MixedPrecision(..., device="
                    f"'{self.root_device.type}') or precision='bf16-mixed'."
                )
        accumulate_on = self.settings.accumulate_grads_on
        if accumulate_on is not None and torch.device(accumulate_on).type == "cuda" and not torch.cuda.is_available():
            raise exception(
                f"accumulate_grads_on={accumulate_on!r}, but CUDA is not available on this machine; set "
                "accumulate_grads_on='cpu' or leave it unset."
            )

    def _single_optimizer(self) -> torch.optim.Optimizer:
        optimizers = self.optimizers
        if len(optimizers) != 1:
            raise self._lightning.MisconfigurationException(
                f"strategy='collaborative' supports exactly one optimizer, but configure_optimizers returned "
                f"{len(optimizers)}. Return a single optimizer (put several parameter groups in it if needed)."
            )
        return optimizers[0]

    def _single_scheduler(self) -> Any:
        configs = self.lr_scheduler_configs
        if len(configs) > 1:
            raise self._lightning.MisconfigurationException(
                f"strategy='collaborative' supports at most one learning-rate scheduler, got {len(configs)}. "
                "Combine them, e.g. with torch.optim.lr_scheduler.SequentialLR or ChainedScheduler."
            )
        if not configs:
            return None
        config = configs[0]
        try:
            check_collaborative_scheduler(config.scheduler, steps_on_metric=config.reduce_on_plateau)
        except ValueError as error:
            raise self._lightning.MisconfigurationException(f"strategy='collaborative': {error}") from None
        return config.scheduler

    def _fp16_scaler(self, trainer: Any) -> Any:
        plugin = trainer.precision_plugin
        if isinstance(plugin, self._lightning.MixedPrecision):
            return getattr(plugin, "scaler", None)
        return None


__all__ = ["CollaborativeStrategyMixin", "LightningNamespace", "STRATEGY_NAME"]
