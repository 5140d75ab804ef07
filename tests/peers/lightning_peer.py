"""One Lightning training peer for the multi-peer tests: a real ``Trainer`` process with the collaborative strategy.

The strategy is configured the way users do it: by name (``Trainer(strategy="collaborative")``, settings from the
``COLLAB_*`` variables the test sets) or, with ``--strategy-args``, as an instance with explicit arguments. A callback
meets the other peers at a start and a finish barrier (records in the DHT, as in ``core_peer.py``), stops training
once the collaboration reached ``--steps`` collaborative steps, and records what the tests check in ``--out``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import threading
import time

import torch
from hivemind.utils import get_dht_time

from tests.support.barrier import barrier as shared_barrier

BARRIER_TIMEOUT = 60.0
FEATURES, CLASSES = 8, 4


def barrier(dht, key: str, name: str, expected: int) -> None:
    """Wait (at most ``BARRIER_TIMEOUT`` s) until ``expected`` peers arrived at ``key`` (tests/support/barrier.py)."""
    shared_barrier(dht, key, name, expected, timeout=BARRIER_TIMEOUT)


def make_data(seed: int, samples: int) -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, FEATURES, generator=generator)
    y = torch.randint(0, CLASSES, (samples,), generator=generator)
    return torch.utils.data.TensorDataset(x, y)


def make_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, 16), torch.nn.Tanh(), torch.nn.Linear(16, CLASSES))


def lr_factor(step: int) -> float:
    return 0.5 ** (step // 2)


def build(namespace: str, args: argparse.Namespace):
    """The LightningModule and the recording callback, built on namespace ``pytorch_lightning`` or ``lightning``."""
    L = importlib.import_module("pytorch_lightning" if namespace == "pl" else "lightning.pytorch")

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_net()
            self.automatic_optimization = not args.manual

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.cross_entropy(self.net(x), y)
            if args.manual:
                opt = self.optimizers()
                self.manual_backward(loss)
                opt.step()
                if args.manual_double_step:
                    opt.step()
                opt.zero_grad()
                return None
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", torch.nn.functional.cross_entropy(self.net(x), y))

        def test_step(self, batch, batch_idx):
            x, y = batch
            self.log("test_loss", torch.nn.functional.cross_entropy(self.net(x), y))

        def predict_step(self, batch, batch_idx):
            return self.net(batch[0]).argmax(-1)

        def configure_optimizers(self):
            if args.inner_optimizer == "adamw":  # DiLoCo's inner optimizer (COLLAB_ALGORITHM=diloco)
                opt = torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=0.01)
            else:
                opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
            if args.optimizers == 2:
                return [opt, torch.optim.SGD(self.parameters(), lr=0.1)]
            if args.scheduler == "none":
                return opt
            if args.scheduler == "plateau":
                scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
                return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "monitor": "val_loss"}}
            scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": args.scheduler}}

    class Recorder(L.Callback):
        """Barriers, the stop condition, and a record of every batch and collaborative step."""

        def __init__(self):
            self.batches, self.per_step, self.lrs_used, self.participants, self.contributions = [], {}, {}, {}, {}
            self.num_peers_seen, self.steps_seen_at_start = 0, None
            self.fits = 0
            self.stop_at = args.steps
            self.met_peers = False
            self.children_during_fit, self.threads_during_fit, self.visible_maddrs = [], [], []

        def on_train_start(self, trainer, pl_module):
            strategy = trainer.strategy
            self.fits += 1
            self.steps_seen_at_start = strategy.collaborative_step
            self.met_peers = self.fits > 1
            if args.join_at_step:  # it has no samples to report before joining: meet at once
                self._meet_peers(strategy)
            self.children_during_fit, self.threads_during_fit = _children(), _live_threads()
            try:
                self.visible_maddrs = [str(addr) for addr in strategy.dht.get_visible_maddrs()]
            except ValueError:  # hivemind raises "No multiaddrs found" for a peer that listens nowhere
                self.visible_maddrs = []
            tracker = strategy.collaborative_optimizer.tracker
            if args.join_at_step:
                while tracker.fetch_now(timeout=5).epoch < args.join_at_step:
                    time.sleep(0.05)
                strategy.dht.store(
                    f"{strategy.settings.run_id}_joined",
                    subkey=args.name,
                    value=True,
                    expiration_time=get_dht_time() + 600,
                )

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            strategy = trainer.strategy
            self.step_before = strategy.collaborative_step
            self.lr_before = strategy.collaborative_optimizer.param_groups[0]["lr"]
            self.downloads_before = strategy.collaborative_optimizer.collaboration_state.state_downloads
            self.batches.append((strategy.collaborative_step, batch[0].clone(), batch[1].clone()))

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.strategy.collaborative_step == args.overflow_at_step:
                next(pl_module.parameters()).grad[0, 0] = float("inf")

        def _meet_peers(self, strategy):
            """The start barrier. Peers meet after reporting their first samples, so that every peer is expected in
            the first collaborative step (peers without samples are not waited for: one that is slow to start would
            miss the first step and download instead)."""
            # publish the first samples now: the optimizer publishes a record between targets at most every
            # min_refresh_period, and this peer's loop waits here, so without it the others would see 0 samples
            # until the reporter's next periodic store (about 30 s: the stall these tests used to have)
            strategy.collaborative_optimizer.tracker.announce(timeout=10)
            barrier(strategy.dht, f"{strategy.settings.run_id}_test_start", args.name, args.peers)
            if not args.join_at_step:  # progress records are published in the background: wait until all show samples
                collab = strategy.collaborative_optimizer
                deadline = time.monotonic() + BARRIER_TIMEOUT
                while time.monotonic() < deadline:
                    view = collab.tracker.fetch_now(timeout=5)
                    at_my_step = view.peers_at(collab.local_step)  # a peer resuming elsewhere reports no samples
                    if len(view.peers) >= args.peers and all(peer.samples > 0 for peer in at_my_step):
                        break
                    time.sleep(0.05)
                else:
                    raise TimeoutError("the other peers' first samples never showed up in the DHT")
            self.met_peers = True

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            strategy = trainer.strategy
            collab = strategy.collaborative_optimizer
            state = collab.collaboration_state
            if not self.met_peers and trainer.global_step > 0:
                self._meet_peers(strategy)
            self.num_peers_seen = max(self.num_peers_seen, strategy.num_peers)
            if strategy.collaborative_step != self.step_before:
                downloaded = state.state_downloads != self.downloads_before
                self.per_step[strategy.collaborative_step] = {
                    "params": [p.detach().clone() for p in pl_module.parameters()],
                    "lr": collab.param_groups[0]["lr"],
                    "downloaded": downloaded,
                }
                if hasattr(collab, "outer_optimizer"):  # DiLoCo: θ_global and the outer momentum
                    self.per_step[strategy.collaborative_step]["global_params"] = [
                        p.detach().clone() for p in collab.global_parameters
                    ]
                if not downloaded:
                    self.participants[self.step_before] = set(state.last_round_participants)
                    self.contributions[self.step_before] = dict(state.last_round_contributions)
                    self.lrs_used[self.step_before] = self.lr_before
                if args.wait_for_joiner_at_step and strategy.collaborative_step == args.wait_for_joiner_at_step:
                    self._wait_for_joiner(strategy)
            if strategy.collaborative_step >= self.stop_at:
                trainer.should_stop = True

        def _wait_for_joiner(self, strategy):
            print(f"waiting for the joiner at step {strategy.collaborative_step}", flush=True)  # the test starts it
            deadline = time.monotonic() + BARRIER_TIMEOUT
            while time.monotonic() < deadline:
                if strategy.dht.get(f"{strategy.settings.run_id}_joined", latest=True) is not None:
                    return
                time.sleep(0.05)
            raise TimeoutError("the late joiner never came")

        def on_train_end(self, trainer, pl_module):
            if args.no_finish_barrier:
                return
            strategy = trainer.strategy
            finish_peers = args.finish_peers or args.peers
            barrier(strategy.dht, f"{strategy.settings.run_id}_test_finish_{self.fits}", args.name, finish_peers)

    return L, Module, Recorder


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--namespace", choices=["pl", "lightning"], default="pl")
    parser.add_argument("--peers", type=int, default=1, help="peers at the start/finish barriers")
    parser.add_argument("--finish-peers", type=int, default=0, help="peers at the finish barrier (default: --peers)")
    parser.add_argument("--steps", type=int, required=True, help="stop at this collaborative step")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--scheduler", choices=["none", "step", "epoch", "plateau"], default="none")
    parser.add_argument("--optimizers", type=int, default=1)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--fp16-on-cpu", action="store_true", help="16-mixed through MixedPrecision(device='cpu')")
    parser.add_argument("--gpu-scaler-on-cpu", action="store_true", help="MixedPrecision(device='cuda') on a CPU")
    parser.add_argument("--overflow-at-step", type=int, default=-1)
    parser.add_argument("--val-check-interval", default=None, help="an int: every n batches; a float: fraction")
    parser.add_argument("--clip", type=float, default=None)
    parser.add_argument("--manual", action="store_true")
    parser.add_argument("--manual-double-step", action="store_true")
    parser.add_argument("--strategy-args", default=None, help="JSON: build CollaborativeStrategy(**these)")
    parser.add_argument("--csv-dir", default=None)
    parser.add_argument("--ckpt-in", default=None, help="fit(ckpt_path=...)")
    parser.add_argument("--ckpt-out", default=None, help="trainer.save_checkpoint(...) after fit")
    parser.add_argument("--fit-twice", action="store_true")
    parser.add_argument("--second-fit-steps", type=int, default=None, help="the second fit stops at this step")
    parser.add_argument("--evaluate", action="store_true", help="also validate, test and predict")
    parser.add_argument("--join-at-step", type=int, default=0)
    parser.add_argument("--wait-for-joiner-at-step", type=int, default=0)
    parser.add_argument("--no-finish-barrier", action="store_true")
    parser.add_argument("--fail-round-at-step", type=int, default=-1, help="only this peer's round of it fails")
    parser.add_argument("--fail-round-start-at-step", type=int, default=-1, help="its round fails as it starts")
    parser.add_argument("--freeze-at-step", type=int, default=-1, help="SIGSTOP in the round of this step")
    parser.add_argument("--freeze-seconds", type=float, default=0.0)
    parser.add_argument("--inner-optimizer", default="sgd", choices=["sgd", "adamw"])
    args = parser.parse_args()

    import lightning_collab
    from tests.peers import core_peer

    # fault hooks of the core peer, patched into the averager class before its process forks (in trainer.fit)
    if args.fail_round_at_step >= 0:
        core_peer.fail_round_after_exchange(args.fail_round_at_step)
    if args.fail_round_start_at_step >= 0:
        core_peer.fail_round_at_start(args.fail_round_start_at_step)
    if args.freeze_at_step >= 0:
        core_peer.freeze_in_round(args.freeze_at_step, args.freeze_seconds)
    L, Module, Recorder = build(args.namespace, args)
    strategy_cls = (
        lightning_collab.CollaborativeStrategy
        if args.namespace == "pl"
        else (lightning_collab.LightningCollaborativeStrategy)
    )
    strategy = strategy_cls(**json.loads(args.strategy_args)) if args.strategy_args is not None else "collaborative"
    plugins = []
    precision = args.precision
    if args.fp16_on_cpu or args.gpu_scaler_on_cpu:
        precision_module = importlib.import_module(L.__name__ + ".plugins.precision")
        device = "cpu" if args.fp16_on_cpu else "cuda"
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3) if args.fp16_on_cpu else None
        plugins.append(precision_module.MixedPrecision("16-mixed", device, scaler=scaler))
        precision = None
    loggers = []
    if args.csv_dir:
        loggers.append(importlib.import_module(L.__name__ + ".loggers").CSVLogger(args.csv_dir, name="run"))
    recorder = Recorder()
    children_before = _children()
    trainer_kwargs = dict(
        strategy=strategy,
        accelerator="cpu",
        devices=1,
        max_epochs=1000,
        accumulate_grad_batches=args.accumulate,
        callbacks=[recorder],
        logger=loggers or False,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        plugins=plugins or None,
        gradient_clip_val=args.clip,
    )
    if precision is not None:
        trainer_kwargs["precision"] = precision
    if args.val_check_interval is not None:
        interval = args.val_check_interval
        trainer_kwargs["val_check_interval"] = float(interval) if "." in interval else int(interval)
    trainer = L.Trainer(**trainer_kwargs)
    model = Module()
    data = make_data(args.data_seed, args.samples)
    train = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=False)
    val = torch.utils.data.DataLoader(make_data(999, 64), batch_size=32)
    threads_before = _live_threads()
    constructed_without_side_effects = trainer.strategy.dht is None and _children() == children_before

    trainer.fit(model, train, val if args.val_check_interval is not None else None, ckpt_path=args.ckpt_in)
    strategy = trainer.strategy
    state = strategy.collaborative_optimizer.collaboration_state
    after_first_fit = {
        "collaborative_step": strategy.collaborative_step,
        "children": _children(),
        "threads": _live_threads(),
        "progress_bar_metrics": {k: float(v) for k, v in trainer.progress_bar_metrics.items()},
        "logged_metrics": {k: float(v) for k, v in trainer.logged_metrics.items()},
    }
    if args.ckpt_out:
        trainer.save_checkpoint(args.ckpt_out)  # after fit returned, i.e. after teardown
    second_fit = None
    if args.fit_twice:
        recorder.per_step.clear()
        trainer.fit_loop.max_epochs = 2000
        recorder.stop_at = args.second_fit_steps if args.second_fit_steps is not None else args.steps
        trainer.fit(model, train)
        scheduler = strategy.collaborative_optimizer.scheduler
        second_fit = {
            "collaborative_step": strategy.collaborative_step,
            "scheduler_last_epoch": scheduler.last_epoch if scheduler is not None else None,
            "first_step_reached": min(recorder.per_step) if recorder.per_step else None,
            "children": _children(),
            "threads": _live_threads(),
            "steps_seen_at_start": recorder.steps_seen_at_start,
        }
    evaluation = None
    if args.evaluate:
        evaluation = {
            "validate": trainer.validate(model, val, verbose=False),
            "test": trainer.test(model, val, verbose=False),
            "predict": torch.cat(trainer.predict(model, val)).tolist(),
            "children": _children(),
        }
    inner = strategy.collaborative_optimizer.opt
    scheduler = strategy.collaborative_optimizer.scheduler
    result = {
        "name": args.name,
        "collaborative_step": strategy.collaborative_step,
        "global_step": trainer.global_step,
        "num_peers_seen": recorder.num_peers_seen,
        "batches": recorder.batches,
        "per_step": recorder.per_step,
        "lrs_used": recorder.lrs_used,
        "participants": recorder.participants,
        "contributions": recorder.contributions,
        "final": [p.detach().clone() for p in model.parameters()],
        "final_optimizer_state": {
            f"{index}.{key}": value.detach().clone()
            for index, param in enumerate(inner.param_groups[0]["params"])
            for key, value in inner.state.get(param, {}).items()
            if isinstance(value, torch.Tensor)
        },
        "final_lr": inner.param_groups[0]["lr"],
        "optimizer_class": type(strategy.collaborative_optimizer).__name__,
        "scheduler_last_epoch": scheduler.last_epoch if scheduler is not None else None,
        "collaboration_state": state.__dict__,
        "peer_id": strategy.collaborative_optimizer.tracker.dht.peer_id.to_base58(),
        "threads_before": threads_before,
        "visible_maddrs": recorder.visible_maddrs,
        "children_during_fit": recorder.children_during_fit,
        "threads_during_fit": recorder.threads_during_fit,
        "join_hint": strategy.join_hint,
        "constructed_without_side_effects": constructed_without_side_effects,
        "after_first_fit": after_first_fit,
        "second_fit": second_fit,
        "evaluation": evaluation,
        "steps_seen_at_start": recorder.steps_seen_at_start,
        "scale": getattr(trainer.precision_plugin, "scaler", None) and trainer.precision_plugin.scaler.get_scale(),
        "client_mode": strategy.settings.client_mode,
    }
    torch.save(result, args.out + ".tmp")
    os.replace(args.out + ".tmp", args.out)
    print(f"{args.name}: done at collaborative step {strategy.collaborative_step}", flush=True)
    return 0


def _children() -> list[str]:
    import psutil

    return sorted(p.name() for p in psutil.Process().children(recursive=True) if p.is_running())


def _live_threads() -> list[str]:
    """Names of the live threads; those of hivemind's process-wide executor (a singleton, created on first use in
    ``hivemind.utils.asyncio``) are marked as such."""
    from hivemind.utils.asyncio import _AsyncContextWrapper

    shared = set(getattr(_AsyncContextWrapper.CONTEXT_EXECUTOR, "_threads", ()) or ())
    return sorted(
        t.name + (" [hivemind process-wide executor]" if t in shared else "")
        for t in threading.enumerate()
        if t is not threading.main_thread() and t.is_alive()
    )


if __name__ == "__main__":
    sys.exit(main())
