"""Train a handwritten-digits classifier collaboratively with Lightning Fabric: ``Fabric(strategy="collaborative")``.

First peer (starts the run and prints the join hint)::

    COLLAB_RUN_ID=digits-fabric COLLAB_TARGET_BATCH_SIZE=256 python examples/fabric/train.py

Second peer, on this or another machine, with the two variables from the first peer's hint::

    COLLAB_RUN_ID=digits-fabric COLLAB_TARGET_BATCH_SIZE=256 COLLAB_INITIAL_PEERS="/ip4/.../p2p/..." \\
        python examples/fabric/train.py --wait-for-peers 2

Every collaborative setting comes from a ``COLLAB_*`` variable (``COLLAB_ALGORITHM=diloco`` trains in DiLoCo mode) or
from ``--config collab.yaml``. The data is scikit-learn's bundled 8x8 digits set (no download); each peer shuffles it
with its own seed. ``--output-dir DIR`` saves the final model, a ``fabric.save`` checkpoint (with the collaborative
step) and a summary.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from lightning.fabric import Fabric
from sklearn.datasets import load_digits

from lightning_collab.fabric import CollaborativeFabricStrategy


def digits(seed: int) -> tuple[torch.utils.data.TensorDataset, torch.utils.data.TensorDataset, torch.Generator]:
    """80% training, 20% validation (the same split on every peer) and this peer's shuffling generator."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    split = int(0.8 * len(x))
    train, val = order[:split], order[split:]
    datasets = torch.utils.data.TensorDataset(x[train], y[train]), torch.utils.data.TensorDataset(x[val], y[val])
    return *datasets, torch.Generator().manual_seed(seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="stop after this many collaborative steps")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per micro-batch of this peer")
    parser.add_argument("--lr", type=float, default=0.4)
    parser.add_argument("--precision", default="32-true", help="32-true or bf16-mixed")
    parser.add_argument("--seed", type=int, default=None, help="this peer's shuffling seed (default: random)")
    parser.add_argument("--wait-for-peers", type=int, default=1, help="before training, wait for this many peers")
    parser.add_argument("--config", default=None, help="a collab.yaml of settings (COLLAB_* variables win)")
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args()

    fabric = Fabric(strategy=CollaborativeFabricStrategy(config=args.config), precision=args.precision, devices=1)
    # (Fabric(strategy="collaborative") is the same, once lightning_collab is imported, without a config file)
    strategy: CollaborativeFabricStrategy = fabric.strategy  # type: ignore[assignment]
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    # counted in collaborative steps: the collaboration steps it once per step; scheduler.step() below does nothing
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    model, optimizer, scheduler = fabric.setup(model, optimizer, scheduler=scheduler)  # joins the collaboration
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    train_set, val_set, generator = digits(seed)
    train = fabric.setup_dataloaders(
        torch.utils.data.DataLoader(train_set, args.batch_size, shuffle=True, generator=generator)
    )
    if args.wait_for_peers > 1:
        strategy.wait_for_peers(args.wait_for_peers)

    micro_batches = 0
    while strategy.collaborative_step < args.steps:
        for x, y in train:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            fabric.backward(loss)
            optimizer.step(batch_size=len(x))  # updates only when the collaboration reached target_batch_size
            optimizer.zero_grad()
            scheduler.step()
            micro_batches += 1
            if strategy.collaborative_step >= args.steps:
                break

    with torch.no_grad():
        x, y = val_set.tensors
        accuracy = (model(x).argmax(-1) == y).float().mean().item()
    summary = {
        "collaborative_step": strategy.collaborative_step,
        "algorithm": strategy.settings.algorithm,
        "optimizer": type(strategy.collaborative_optimizer).__name__,
        "micro_batches": micro_batches,
        "val_accuracy": accuracy,
    }
    fabric.print(f"done at collaborative step {strategy.collaborative_step}: validation accuracy {accuracy:.3f}")
    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        fabric.save(out / "checkpoint.ckpt", {"model": model, "optimizer": optimizer})  # keeps the step
        torch.save(model.module.state_dict(), out / "model.pt")
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    strategy.shutdown()


if __name__ == "__main__":
    main()
