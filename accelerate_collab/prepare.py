"""``prepare_collaborative``: turn an Accelerate script's optimizer and scheduler into collaborative ones."""

from __future__ import annotations

import atexit
from pathlib import Path
from typing import Any

import torch
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.scheduler import AcceleratedScheduler

from accelerate_collab.batch import MicroBatchCounter
from accelerate_collab.metrics import ProgressReporter
from accelerate_collab.optimizer import CollaborativeAcceleratedOptimizer
from accelerate_collab.scheduler import CollaborativeAcceleratedScheduler
from collab_core import CollaborativeOptimizer, CollaborativeSettings
from collab_core.backup import BACKUP_FILE
from collab_core.join import Membership, join
from collab_core.local_peer import LocalGroup
from collab_core.log import get_logger
from collab_core.scheduler import check_collaborative_scheduler

logger = get_logger(__name__)


def prepare_collaborative(
    accelerator: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None = None,
    *,
    config: CollaborativeSettings,
    dht: Any | None = None,
    progress_bar: bool = True,
    log_metrics: bool = True,
) -> tuple[CollaborativeAcceleratedOptimizer, CollaborativeAcceleratedScheduler | None]:
    """Join the collaboration described by ``config``; return the optimizer and scheduler to train with.

    Call it on every process of ``accelerate launch``, after creating the ``Accelerator`` and before
    ``accelerator.prepare``. The main process starts the DHT (printing how other peers join) and the collaborative
    optimizer; the other local processes of this peer follow it (one collaborative peer per launch). Pass the
    results to ``accelerator.prepare`` as usual: they are marked prepared, so they are kept as they are.

    Args:
        accelerator: the script's ``accelerate.Accelerator``. Its gradient accumulation, process count and (fp16)
            gradient scaler are taken into account.
        optimizer: a plain PyTorch optimizer over the model's parameters (not yet prepared).
        scheduler: an optional learning-rate scheduler built on ``optimizer`` (not yet prepared). It is advanced
            exactly once per collaborative step; ``scheduler.step()`` in the loop does nothing.
        config: the peer's settings, e.g. ``CollaborativeConfig.from_yaml("collab.yaml")``.
        dht: an already running ``hivemind.DHT`` to use on the main process instead of starting one from
            ``config`` (then the caller shuts it down).
        progress_bar: show a tqdm progress bar of the collaboration on the main process.
        log_metrics: send collaboration metrics to ``accelerator.log`` (if trackers were initialised).

    Returns:
        ``(optimizer, scheduler)``: a :class:`CollaborativeAcceleratedOptimizer` and, if a scheduler was given, a
        :class:`CollaborativeAcceleratedScheduler` (else None).

    Raises:
        TypeError: if an argument has the wrong type (e.g. an optimizer that ``accelerator.prepare`` already wrapped).
        ValueError: if ``scheduler`` is not built on ``optimizer``.
        collab_core.CollaborativeConfigError: for invalid settings.
        collab_core.dht.DHTStartupError: if the DHT cannot start or reach ``initial_peers``.
    """
    _check_arguments(optimizer, scheduler, config)
    _check_distributed_type(accelerator)
    group = LocalGroup(accelerator.num_processes, accelerator.is_main_process, accelerator.device)
    counter = MicroBatchCounter(accelerator.num_processes, config.batch_size)
    grad_scaler = getattr(accelerator, "scaler", None)
    collaborative: CollaborativeOptimizer | None = None
    reporter: ProgressReporter | None = None
    own_dht = None

    def join_on_main_process() -> Membership:
        _warn_on_device_mismatch(optimizer, accelerator.device)
        # step() always passes the samples of the peer's real optimizer step: no batch_size_per_step
        return join(
            optimizer,
            config,
            scheduler=scheduler,
            grad_scaler=grad_scaler,
            dht=dht,
            print_hint=dht is None,
            batch_size_per_step=None,
        )

    membership = group.run_on_leader(join_on_main_process, "join the collaboration")  # None on the other processes
    if membership is not None:
        collaborative = membership.optimizer
        own_dht = membership.dht if membership.owns_dht else None
        reporter = ProgressReporter(accelerator, collaborative, progress_bar=progress_bar, log_metrics=log_metrics)
    wrapped = CollaborativeAcceleratedOptimizer(
        optimizer,
        collaborative=collaborative,
        scheduler=scheduler,
        group=group,
        counter=counter,
        reuse_grad_buffers=config.reuse_grad_buffers,
        grad_scaler=grad_scaler,
        reporter=reporter,
        dht=own_dht,
    )
    atexit.register(wrapped.shutdown)
    accelerator.register_load_state_pre_hook(_weights_of_backups_come_with_the_optimizer)
    wrapped_scheduler = CollaborativeAcceleratedScheduler(scheduler, wrapped) if scheduler is not None else None
    return wrapped, wrapped_scheduler


def _weights_of_backups_come_with_the_optimizer(models: list[Any], input_dir: str) -> None:
    """``accelerator.load_state`` hook: a swarm backup folder (``collab monitor --backup-dir``) has no model file;
    its parameters are restored with the optimizer state (by position, as in a state download)."""
    if (Path(input_dir) / BACKUP_FILE).is_file():
        models.clear()


def _check_arguments(optimizer: Any, scheduler: Any, config: Any) -> None:
    if isinstance(optimizer, AcceleratedOptimizer):
        raise TypeError(
            "optimizer was already prepared by accelerator.prepare(); call prepare_collaborative(accelerator, "
            "optimizer, scheduler, config=...) first and pass its results to accelerator.prepare()."
        )
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(scheduler, AcceleratedScheduler):
        raise TypeError(
            "scheduler was already prepared by accelerator.prepare(); pass the plain scheduler to "
            "prepare_collaborative() and its result to accelerator.prepare()."
        )
    check_collaborative_scheduler(scheduler, optimizer)
    if not isinstance(config, CollaborativeSettings):
        raise TypeError(
            f"config must be a CollaborativeConfig, got {type(config).__name__}; load it with "
            "CollaborativeConfig.from_yaml('collab.yaml')."
        )


# sharded or engine-managed training (DeepSpeed, FSDP, Megatron-LM, XLA) owns the optimizer step and the gradients
_UNSUPPORTED = ("DEEPSPEED", "FSDP", "MEGATRON_LM", "XLA")


def _check_distributed_type(accelerator: Any) -> None:
    kind = str(getattr(accelerator.distributed_type, "name", accelerator.distributed_type))
    if kind in _UNSUPPORTED:
        raise NotImplementedError(
            f"prepare_collaborative supports single-process and DDP training (multi_gpu / multi_cpu), not {kind}: "
            "launch without DeepSpeed/FSDP/Megatron-LM/XLA (e.g. accelerate launch --multi_gpu)."
        )


def _warn_on_device_mismatch(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    devices = {param.device for group in optimizer.param_groups for param in group["params"]}
    if any(d.type != device.type for d in devices):
        logger.warning(
            f"the optimizer's parameters are on {sorted(map(str, devices))}, the accelerator's device is {device}: "
            "gradients will be accumulated on the parameters' current device. Call model.to(accelerator.device) "
            "before creating the optimizer to accumulate them there."
        )


__all__ = ["prepare_collaborative"]
