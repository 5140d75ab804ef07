"""One Lightning Fabric training peer for the multi-peer tests: ``Fabric(strategy="collaborative")`` in its own process.

Settings come from the ``COLLAB_*`` variables the test sets. The loop is a plain Fabric loop: ``fabric.setup(model,
optimizer, scheduler=...)``, ``fabric.backward(loss)``, ``optimizer.step(batch_size=...)`` (or ``optimizer.step()``
with ``--batch-size-from-setting``, i.e. ``COLLAB_BATCH_SIZE``), ``scheduler.step()`` at every iteration (the stand-in
ignores it). The peer meets the others at a start barrier (after its first samples are in the DHT) and a finish
barrier, stops at ``--steps`` collaborative steps, optionally saves ``fabric.save`` a checkpoint and loads it into a
fresh Fabric of a new, empty run (``--ckpt-out``), and records what the tests check in ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from tests.peers.lightning_peer import BARRIER_TIMEOUT, barrier, lr_factor, make_data, make_net

BASE_LR = 0.1


def make_optimizer(net: torch.nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    opt = torch.optim.SGD(net.parameters(), lr=BASE_LR, momentum=0.9)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)


def meet_peers(strategy, name: str, peers: int) -> None:
    """The start barrier, after this peer's first samples are reported (as in ``lightning_peer.py``)."""
    # publish the first samples now: between targets the optimizer publishes at most every min_refresh_period, so
    # without it the others see 0 samples until the reporter's next periodic store (a 30 s stall per run)
    strategy.collaborative_optimizer.tracker.announce(timeout=10)
    barrier(strategy.dht, f"{strategy.settings.run_id}_test_start", name, peers)
    collab = strategy.collaborative_optimizer
    deadline = time.monotonic() + BARRIER_TIMEOUT
    while time.monotonic() < deadline:
        view = collab.tracker.fetch_now(timeout=5)
        if len(view.peers) >= peers and all(peer.samples > 0 for peer in view.peers_at(collab.local_step)):
            return
        time.sleep(0.05)
    raise TimeoutError("the other peers' first samples never showed up in the DHT")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--peers", type=int, default=1)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batch-size-from-setting", action="store_true", help="optimizer.step() without batch_size")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--ckpt-out", default=None, help="fabric.save here, then load it into a fresh Fabric")
    args = parser.parse_args()

    from lightning.fabric import Fabric

    import lightning_collab  # registers "collaborative" in Fabric's strategy registry

    fabric = Fabric(strategy="collaborative", accelerator="cpu", devices=1, precision=args.precision)
    strategy = fabric.strategy
    assert isinstance(strategy, lightning_collab.CollaborativeFabricStrategy)
    net = make_net()
    opt, sched = make_optimizer(net)
    model, optimizer, scheduler = fabric.setup(net, opt, scheduler=sched)
    loader = fabric.setup_dataloaders(
        torch.utils.data.DataLoader(make_data(args.data_seed, args.samples), batch_size=args.batch_size)
    )
    collab = strategy.collaborative_optimizer
    batches, contributions, lrs_used, output_dtypes = [], {}, {}, set()
    met_peers = False
    # what the first layer computes in (Fabric hands the model's output back in float32)
    net[0].register_forward_hook(lambda _module, _inputs, output: output_dtypes.add(str(output.dtype)))
    while strategy.collaborative_step < args.steps:
        for x, y in loader:
            step_before, lr_before = strategy.collaborative_step, opt.param_groups[0]["lr"]
            downloads_before = collab.collaboration_state.state_downloads
            batches.append((step_before, x.clone(), y.clone()))
            logits = model(x)
            fabric.backward(torch.nn.functional.cross_entropy(logits, y))
            if args.batch_size_from_setting:
                optimizer.step()
            else:
                optimizer.step(batch_size=len(x))
            optimizer.zero_grad()
            scheduler.step()  # the stand-in: the collaboration steps the real scheduler
            if not met_peers:
                meet_peers(strategy, args.name, args.peers)
                met_peers = True
            state = collab.collaboration_state
            if strategy.collaborative_step != step_before and state.state_downloads == downloads_before:
                contributions[step_before] = dict(state.last_round_contributions)
                lrs_used[step_before] = lr_before
            if strategy.collaborative_step >= args.steps:
                break
    barrier(strategy.dht, f"{strategy.settings.run_id}_test_finish", args.name, args.peers)
    result = {
        "name": args.name,
        "peer_id": strategy.dht.peer_id.to_base58(),
        "collaborative_step": strategy.collaborative_step,
        "num_peers": strategy.num_peers,
        "batches": batches,
        "contributions": contributions,
        "lrs_used": lrs_used,
        "final_lr": opt.param_groups[0]["lr"],
        "scheduler_last_epoch": sched.last_epoch,
        "final": [p.detach().clone() for p in net.parameters()],
        "param_dtypes": sorted({str(p.dtype) for p in net.parameters()}),
        "output_dtypes": sorted(output_dtypes),
        "optimizer_class": type(collab).__name__,
    }
    if args.ckpt_out:
        fabric.save(args.ckpt_out, {"model": model, "optimizer": optimizer, "note": "from fabric_peer"})
    strategy.shutdown()
    if args.ckpt_out:
        result["resumed"] = resume(args.ckpt_out, Fabric, lightning_collab)
    torch.save(result, args.out + ".tmp")
    os.replace(args.out + ".tmp", args.out)
    print(f"{args.name}: done at collaborative step {result['collaborative_step']}", flush=True)
    return 0


def resume(ckpt: str, Fabric, lightning_collab) -> dict:
    """Load ``ckpt`` with ``fabric.load`` into a fresh Fabric that starts a new run of its own (no peers)."""
    strategy = lightning_collab.CollaborativeFabricStrategy(run_id=f"resumed-{os.getpid()}", initial_peers=[])
    fabric = Fabric(strategy=strategy, accelerator="cpu", devices=1)
    net = make_net()
    opt, sched = make_optimizer(net)
    model, optimizer, scheduler = fabric.setup(net, opt, scheduler=sched)
    step_before_load = strategy.collaborative_step
    remainder = fabric.load(ckpt, {"model": model, "optimizer": optimizer})
    resumed = {
        "step_before_load": step_before_load,
        "collaborative_step": strategy.collaborative_step,
        "params": [p.detach().clone() for p in net.parameters()],
        "lr": opt.param_groups[0]["lr"],
        "scheduler_last_epoch": sched.last_epoch,
        "remainder": remainder,
    }
    strategy.shutdown()
    return resumed


if __name__ == "__main__":
    sys.exit(main())
