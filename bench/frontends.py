"""W5 peers: the W1 training through ``Trainer(strategy="collaborative")`` or ``prepare_collaborative``.

The same model, data, padding and records as :mod:`bench.peer`; settings from the ``COLLAB_*`` environment.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from bench.model import Batches, make_mlp, make_sgd
from bench.recorder import Recorder
from bench.sides import probe_core
from tests.support.barrier import barrier


def run(args: argparse.Namespace, recorder: Recorder) -> int:
    """Run the ``lightning`` or ``accelerate`` side of W5."""
    return run_lightning(args, recorder) if args.side == "lightning" else run_accelerate(args, recorder)


def _pad(since: float, pad: float) -> None:
    remaining = pad - (time.perf_counter() - since)
    if remaining > 0:
        time.sleep(remaining)


class _Stream(torch.utils.data.IterableDataset):
    """This peer's endless stream of W1 batches (already batched)."""

    def __init__(self, index: int, batch_size: int):
        self.index, self.batch_size = index, batch_size

    def __iter__(self):
        batches = Batches(self.index, self.batch_size)
        while True:
            yield batches.next()


def run_lightning(args: argparse.Namespace, recorder: Recorder) -> int:
    import pytorch_lightning as pl

    import lightning_collab  # noqa: F401 - registers strategy="collaborative"

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_mlp()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def on_after_backward(self) -> None:
            _pad(self.batch_started, args.pad)
            self.step_called_at = time.time()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return make_sgd(self.parameters())

    class Timing(pl.Callback):
        def on_train_start(self, trainer: Any, module: Any) -> None:
            strategy = trainer.strategy
            probe_core(strategy.collaborative_optimizer, recorder)
            recorder.extra["ready_at"] = time.time()
            barrier(strategy.dht, f"{args.run_id}_start", args.name, args.peers)
            strategy.collaborative_optimizer.tracker.fetch_now(timeout=5)
            recorder.extra["started_training_at"] = time.time()

        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
            module.batch_started, self.t0 = time.perf_counter(), time.time()
            self.before = trainer.strategy.collaborative_step

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            after = trainer.strategy.collaborative_step
            recorder.call(self.t0, module.step_called_at, time.time(), self.before, after)
            if after >= args.steps:
                trainer.should_stop = True

        def on_train_end(self, trainer: Any, module: Any) -> None:
            strategy = trainer.strategy
            recorder.extra["state"] = dict(strategy.collaborative_optimizer.collaboration_state.__dict__)
            recorder.save(list(module.parameters()))
            barrier(strategy.dht, f"{args.run_id}_finish", args.name, args.finish_peers)

    module = Module()
    loader = torch.utils.data.DataLoader(_Stream(args.index, args.batch_size), batch_size=None)
    trainer = pl.Trainer(
        strategy="collaborative",
        accelerator="cpu",
        devices=1,
        max_steps=-1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Timing()],
    )
    trainer.fit(module, loader)
    return 0


def run_accelerate(args: argparse.Namespace, recorder: Recorder) -> int:
    from accelerate import Accelerator

    from accelerate_collab import CollaborativeConfig, prepare_collaborative

    accelerator = Accelerator(cpu=True)
    model = make_mlp()
    optimizer, _ = prepare_collaborative(
        accelerator, make_sgd(model.parameters()), config=CollaborativeConfig.from_env(), progress_bar=False
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    core = optimizer.collaborative_optimizer
    probe_core(core, recorder)
    recorder.extra["ready_at"] = time.time()
    barrier(core.dht, f"{args.run_id}_start", args.name, args.peers)
    core.tracker.fetch_now(timeout=5)
    recorder.extra["started_training_at"] = time.time()
    batches = Batches(args.index, args.batch_size)
    while optimizer.collaborative_step < args.steps:
        t0, started = time.time(), time.perf_counter()
        x, y = batches.next()
        accelerator.backward(torch.nn.functional.cross_entropy(model(x), y))
        _pad(started, args.pad)
        t_step, before = time.time(), optimizer.collaborative_step
        optimizer.step(batch_size=args.batch_size)
        optimizer.zero_grad()
        recorder.call(t0, t_step, time.time(), before, optimizer.collaborative_step)
    recorder.extra["state"] = dict(core.collaboration_state.__dict__)
    recorder.save(list(accelerator.unwrap_model(model).parameters()))
    barrier(core.dht, f"{args.run_id}_finish", args.name, args.finish_peers)
    optimizer.shutdown()
    accelerator.end_training()
    return 0
