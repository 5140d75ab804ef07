"""One Lightning peer with ``--devices`` local processes (``Trainer(strategy="collaborative", devices=N)``).

With N > 1 Lightning's launcher re-runs this script for local ranks 1..N-1 (same arguments, ``LOCAL_RANK`` set): the
processes are DDP over gloo and act as one collaborative peer. Every process records its own micro-batches (labelled
with the collaborative step they were computed at), its parameters and learning rate after every change of the
collaborative step, and its final state; rank 0 writes ``--out``, rank r writes ``--out.rank<r>``. Rank 0 meets the
other peers at a start and a finish barrier (records in the DHT, as in ``lightning_peer.py``); the processes of a
peer meet at a torch.distributed barrier once every one has saved, so rank 0 exits only after its followers saved.
With ``--resume-steps`` a second ``fit`` (a new Trainer and model in the same processes) resumes from the checkpoint
of the first with ``ckpt_path``, alone, in a run of its own.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from hivemind.utils import get_dht_time

from tests.peers.lightning_peer import BARRIER_TIMEOUT, barrier, lr_factor, make_data, make_net


class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = make_net()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class Recorder(pl.Callback):
    def __init__(self, args: argparse.Namespace, steps: int, peers: int):
        self.args, self.steps, self.peers = args, steps, peers
        self.batches, self.per_step, self.contributions = [], {}, {}
        self.met_peers = False
        self.downloads = 0
        self.had_dht = None
        self.step_at_start = None
        self.params_at_start = None

    def on_train_start(self, trainer, pl_module):
        self.had_dht = trainer.strategy.dht is not None
        self.step_at_start = trainer.strategy.collaborative_step
        self.params_at_start = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.step_before = trainer.strategy.collaborative_step
        self.batches.append((self.step_before, batch[0].clone(), batch[1].clone()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        strategy = trainer.strategy
        collab = strategy.collaborative_optimizer  # None on local ranks > 0
        if collab is not None and not self.met_peers and trainer.global_step > 0:
            self._meet_peers(strategy)
        step = strategy.collaborative_step
        if step != self.step_before:
            self.per_step[step] = {
                "params": [p.detach().clone() for p in pl_module.parameters()],
                "lr": trainer.optimizers[0].param_groups[0]["lr"],
            }
            if collab is not None:
                state = collab.collaboration_state
                if state.state_downloads == self.downloads:
                    self.contributions[self.step_before] = dict(state.last_round_contributions)
                self.downloads = state.state_downloads
                self._publish_step(strategy, step)
                if step == self.args.wait_for_peers_at_step:
                    self._wait_for_peers_at(strategy, step)
        if step >= self.steps:  # the same decision on every local process: they share the step
            trainer.should_stop = True

    def _meet_peers(self, strategy):
        """The start barrier, after this peer's first samples are published (see lightning_peer.py)."""
        collab = strategy.collaborative_optimizer
        collab.tracker.announce(timeout=10)
        barrier(strategy.dht, f"{strategy.settings.run_id}_test_start", self.args.name, self.peers)
        deadline = time.monotonic() + BARRIER_TIMEOUT
        while time.monotonic() < deadline:
            view = collab.tracker.fetch_now(timeout=5)
            if len(view.peers) >= self.peers and all(p.samples > 0 for p in view.peers_at(collab.local_step)):
                break
            time.sleep(0.05)
        else:
            raise TimeoutError("the other peers' first samples never showed up in the DHT")
        self.met_peers = True

    def _publish_step(self, strategy, step):
        key = f"{strategy.settings.run_id}_test_at_step"
        strategy.dht.store(key, subkey=self.args.name, value=step, expiration_time=get_dht_time() + 600)

    def _wait_for_peers_at(self, strategy, step):
        """Hold this peer at ``step`` until every other peer reached it too (e.g. by a state download)."""
        key = f"{strategy.settings.run_id}_test_at_step"
        deadline = time.monotonic() + BARRIER_TIMEOUT
        while time.monotonic() < deadline:
            entry = strategy.dht.get(key, latest=True)
            records = entry.value.items() if entry is not None else ()
            others = {subkey: record.value for subkey, record in records if subkey != self.args.name}
            if len(others) >= self.peers - 1 and all(value >= step for value in others.values()):
                return
            time.sleep(0.05)
        raise TimeoutError(f"the other peers never reached collaborative step {step}")

    def on_train_end(self, trainer, pl_module):
        strategy = trainer.strategy
        if strategy.collaborative_optimizer is not None:
            barrier(strategy.dht, f"{strategy.settings.run_id}_test_finish", self.args.name, self.peers)


def fit(
    args: argparse.Namespace, strategy, steps: int, peers: int, ckpt_in: str | None, precision: str = "32-true"
) -> dict:
    """One ``Trainer.fit`` to collaborative step ``steps`` with ``peers`` peers; this process's records of it."""
    recorder = Recorder(args, steps, peers)
    trainer = pl.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=args.devices,
        max_epochs=1000,
        callbacks=[recorder],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        precision=precision,
    )
    model = Module()
    train = torch.utils.data.DataLoader(make_data(args.data_seed, args.samples), batch_size=args.batch_size)
    trainer.fit(model, train, ckpt_path=ckpt_in)
    if args.ckpt_out and ckpt_in != args.ckpt_out:
        trainer.save_checkpoint(args.ckpt_out)  # every process calls it (a barrier); rank 0 writes it
    strategy = trainer.strategy
    collab = strategy.collaborative_optimizer
    return {
        "name": args.name,
        "rank": trainer.global_rank,
        "run_id": strategy.settings.run_id,
        "strategy_class": type(strategy).__name__,
        "collaborative_step": strategy.collaborative_step,
        "batches": recorder.batches,
        "per_step": recorder.per_step,
        "contributions": recorder.contributions,
        "final": [p.detach().clone() for p in model.parameters()],
        "final_lr": trainer.optimizers[0].param_groups[0]["lr"],
        "had_dht": recorder.had_dht,
        "step_at_start": recorder.step_at_start,
        "params_at_start": recorder.params_at_start,
        "scheduler_last_epoch": trainer.lr_scheduler_configs[0].scheduler.last_epoch,
        "precision": trainer.precision,
        "peer_id": collab.tracker.dht.peer_id.to_base58() if collab is not None else None,
        "collaboration_state": collab.collaboration_state.__dict__ if collab is not None else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--peers", type=int, default=1)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--ckpt-out", default=None)
    parser.add_argument("--ckpt-in", default=None, help="fit(ckpt_path=...)")
    parser.add_argument("--resume-steps", type=int, default=0, help="then fit again from --ckpt-out to this step")
    parser.add_argument("--resume-precision", default="32-true", help="the Trainer precision of that second fit")
    parser.add_argument("--fail-round-at-step", type=int, default=-1, help="only this peer's round of it fails")
    parser.add_argument("--wait-for-peers-at-step", type=int, default=-1, help="hold there until all peers are")
    args = parser.parse_args()

    import lightning_collab  # registers strategy="collaborative"
    from tests.peers import core_peer

    if args.fail_round_at_step >= 0:  # patched into the averager class before its process forks (in fit, rank 0)
        core_peer.fail_round_after_exchange(args.fail_round_at_step)

    result = fit(args, "collaborative", args.steps, args.peers, args.ckpt_in)
    if args.resume_steps:
        # a fresh Trainer and model in the same processes (the local process group stays) resume from the
        # checkpoint just written, alone, in a run of their own
        assert args.ckpt_out
        strategy = lightning_collab.CollaborativeStrategy(
            run_id=f"{result['run_id']}-resume", default_refresh_period=0.5
        )
        result["resumed"] = fit(args, strategy, args.resume_steps, 1, args.ckpt_out, args.resume_precision)
    rank = result["rank"]
    out = args.out if rank == 0 else f"{args.out}.rank{rank}"
    torch.save(result, out + ".tmp")
    os.replace(out + ".tmp", out)
    print(f"{args.name} rank {rank}: done at collaborative step {result['collaborative_step']}", flush=True)
    if args.devices > 1:
        dist.barrier()  # rank 0 exits (and the test reads the results) only once every local process saved
        if rank > 0:
            # saved and synchronised: leave without the interpreter's teardown, in which torch 2.13's gloo sometimes
            # aborts (see tests/unit/test_local_peer.py); rank 0's exit status is the peer's
            os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
