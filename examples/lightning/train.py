"""Train a handwritten-digits classifier collaboratively with Lightning, from a LightningCLI YAML config.

First peer (starts the run and prints the join hint)::

    python examples/lightning/train.py fit --config examples/lightning/config.yaml

(``--config examples/lightning/config_diloco.yaml`` trains in DiLoCo mode: two settings differ.)

Second peer, on this or another machine, with the two variables from the first peer's hint::

    COLLAB_RUN_ID=digits COLLAB_INITIAL_PEERS="/ip4/.../p2p/..." \\
        python examples/lightning/train.py fit --config examples/lightning/config.yaml

The data is scikit-learn's bundled 8x8 digits set (no download). Each peer shuffles it with its own seed (or trains
on its own shard: ``--data.shard i --data.num_shards n``); all peers end with the same weights. ``--output_dir DIR``
saves the final model and its validation accuracy; ``--status_file FILE`` keeps a JSON snapshot of this peer's
progress up to date (``make demo`` reads it for its live view).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import torchmetrics
from pytorch_lightning.cli import LightningCLI
from sklearn.datasets import load_digits

import lightning_collab  # noqa: F401  (registers strategy="collaborative"; class_path in the YAML works without it)
from collab_core.reporting import CollaborationProgress, RateMeter


class DigitsClassifier(pl.LightningModule):
    """A small MLP on 8x8 digit images.

    Args:
        hidden: Width of the hidden layer.
        lr: Base learning rate of SGD with momentum (scaled down by a cosine schedule over the collaborative steps).
        collaborative_steps: Stop after the collaboration took this many steps (optimizer updates).
        wait_for_peers: Before training, wait until the collaboration has this many peers (this one included).
    """

    def __init__(self, hidden: int = 64, lr: float = 0.4, collaborative_steps: int = 40, wait_for_peers: int = 1):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))
        self.val_accuracy = torchmetrics.classification.MulticlassAccuracy(num_classes=10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_accuracy(self(x), y)
        self.log("val_accuracy", self.val_accuracy, prog_bar=True)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        # stepped once per collaborative step by the strategy, identically on every peer
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.hparams.collaborative_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_train_start(self) -> None:
        if self.hparams.wait_for_peers > 1:
            self.trainer.strategy.wait_for_peers(self.hparams.wait_for_peers)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.trainer.strategy.collaborative_step >= self.hparams.collaborative_steps:
            self.trainer.should_stop = True


class DigitsData(pl.LightningDataModule):
    """scikit-learn's digits (1797 images): 80% training, 20% validation (the same split on every peer).

    Args:
        batch_size: Samples per training batch of this peer (peers may use different sizes).
        seed: Seed of this peer's shuffling (peers should differ, so they contribute different batches).
        shard: Which part of the training set this peer trains on (0 <= shard < num_shards).
        num_shards: Into how many parts the training set is split (1: every peer sees all of it).
    """

    def __init__(self, batch_size: int = 32, seed: int | None = None, shard: int = 0, num_shards: int = 1):
        super().__init__()
        if not 0 <= shard < num_shards:
            raise ValueError(f"data.shard must be in [0, num_shards={num_shards}), got {shard}")
        self.batch_size, self.shard, self.num_shards = batch_size, shard, num_shards
        self.seed = seed if seed is not None else int.from_bytes(os.urandom(4), "little")

    def setup(self, stage: str) -> None:
        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        split = int(0.8 * len(x))
        train = order[:split][self.shard :: self.num_shards]
        self.train_set = torch.utils.data.TensorDataset(x[train], y[train])
        self.val_set = torch.utils.data.TensorDataset(x[order[split:]], y[order[split:]])

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(self.seed)
        return torch.utils.data.DataLoader(self.train_set, self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.val_set, batch_size=256)


class PeerStatusFile(pl.Callback):
    """Keeps ``path`` a JSON snapshot of this peer's progress, rewritten every ``interval`` seconds by a thread.

    A thread (not a training hook) because the interesting moments, averaging and state downloads, happen inside
    ``optimizer.step()``, when no hook runs. Its numbers follow ``collab_core.reporting``, like the progress bars:
    this peer's samples/s over the last seconds of real time, and an ETA that is None while unknown.

    The thread ends (joined) in ``teardown``, at the end of ``fit``: a daemon thread still running inside torch when
    the interpreter exits aborts the process ("terminate called without an active exception", exit code -6, after
    the model was saved), so a thread that calls torch must end before the program does.
    """

    def __init__(self, path: str, interval: float = 0.3):
        self.path, self.interval = Path(path), interval
        self.state, self.samples = "joining", 0
        self.meter = RateMeter()  # this peer's samples/s (only the writer thread touches it)
        self.progress = CollaborationProgress("status", log=lambda level, message: None)  # the collaboration's ETA
        self.trainer: pl.Trainer | None = None
        self._stop = threading.Event()
        self._write_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="PeerStatusFile", daemon=True)
        self._thread.start()

    def on_train_start(self, trainer, pl_module) -> None:
        self.trainer, self.state = trainer, "training"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.samples += len(batch[0])

    def on_train_end(self, trainer, pl_module) -> None:
        self.state = "finished"
        self._write()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.state = "left" if isinstance(exception, KeyboardInterrupt) else "failed"
        self.stop()  # Lightning calls no callback teardown after an exception
        self._write()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.stop()

    def stop(self) -> None:
        """End the writer thread and wait for it (idempotent); the file keeps the last snapshot."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _snapshot(self) -> dict:
        self.meter.observe(self.samples)
        rate = self.meter.rate() if self.state == "training" else None  # compute and collaboration waits included
        snapshot = {"state": self.state, "samples": self.samples, "samples_per_second": rate, "time": time.time()}
        strategy = getattr(self.trainer, "strategy", None)
        optimizer = getattr(strategy, "collaborative_optimizer", None)
        if optimizer is not None:
            state = optimizer.collaboration_state
            if self.state == "training" and optimizer.activity in ("averaging", "downloading"):
                snapshot["state"] = optimizer.activity
            progress = self.progress.update(state)
            snapshot.update(
                step=state.optimizer_step,
                peers=state.num_peers,
                samples_accumulated=state.samples_accumulated,
                target_batch_size=state.target_batch_size,
                eta=progress.eta_seconds,
            )
        metrics = getattr(self.trainer, "callback_metrics", {}) or {}
        for name in ("train_loss", "val_accuracy"):
            if name in metrics:
                snapshot[name] = float(metrics[name])
        return snapshot

    def _write(self) -> None:
        # the writer thread and the training thread (on_train_end, on_exception) both write: one at a time, or one
        # moves the other's temporary file away (FileNotFoundError at the end of a run)
        with self._write_lock:
            temporary = self.path.with_suffix(".tmp")
            temporary.write_text(json.dumps(self._snapshot()))
            os.replace(temporary, self.path)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._write()
            except Exception:  # noqa: S112 - a snapshot taken mid-update: the next one will do
                continue


class CollaborativeCLI(LightningCLI):
    """LightningCLI with ``--output_dir`` (after ``fit``, save the final model and its validation accuracy there)
    and ``--status_file`` (keep a JSON snapshot of this peer's progress there)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--output_dir", type=str | None, default=None, help="Save the final model here")
        parser.add_argument("--status_file", type=str | None, default=None, help="Keep a progress snapshot here")

    def before_fit(self) -> None:
        status_file = self.config[self.subcommand].get("status_file")
        if status_file:
            self.trainer.callbacks.append(PeerStatusFile(status_file))

    def after_fit(self) -> None:
        output_dir = self.config[self.subcommand].get("output_dir")
        if not output_dir:
            return
        metrics = self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)[0]
        strategy = self.trainer.strategy
        path = Path(output_dir)
        path.mkdir(parents=True, exist_ok=True)
        torch.save(self.model.state_dict(), path / "model.pt")
        summary = {
            "collaborative_step": getattr(strategy, "collaborative_step", None),
            "algorithm": strategy.settings.algorithm if hasattr(strategy, "settings") else None,
            "val_accuracy": metrics["val_accuracy"],
            "optimizer_calls": self.trainer.global_step,
        }
        (path / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"saved {path / 'model.pt'}: {summary}", flush=True)


def main() -> None:
    start_file = os.environ.get("DEMO_START_FILE")
    if start_file:  # make demo: imports are done, join only when told to (a "late" peer without the start-up wait)
        while not os.path.exists(start_file):
            time.sleep(0.1)
    # no config.yaml copy in the working directory (LightningCLI writes one to the log dir, here the cwd)
    CollaborativeCLI(DigitsClassifier, DigitsData, save_config_callback=None)


if __name__ == "__main__":
    main()
