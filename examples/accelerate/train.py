"""Train a digit classifier together with other peers: an ordinary Accelerate script plus four collaborative lines.

The data is scikit-learn's bundled 8x8 digits (no download); every peer trains on its own shuffled order of the
training split and all of them apply the same averaged update once they together processed ``target_batch_size``
samples. First peer (it prints the ``COLLAB_INITIAL_PEERS=...`` line the others need)::

    accelerate launch examples/accelerate/train.py --collab-config examples/accelerate/collab.yaml

Second peer (another terminal or machine; any number of local processes)::

    COLLAB_INITIAL_PEERS="/ip4/.../tcp/.../p2p/12D3KooW..." accelerate launch --mixed_precision bf16 \\
        examples/accelerate/train.py --collab-config examples/accelerate/collab.yaml

DiLoCo mode (local inner steps, one outer step per ``target_batch_size`` samples): ``--collab-config
examples/accelerate/collab_diloco.yaml`` (two settings differ: ``algorithm`` and ``outer_momentum``).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from accelerate import Accelerator
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torchmetrics.classification import MulticlassAccuracy
from tqdm.auto import tqdm

from accelerate_collab import CollaborativeConfig, prepare_collaborative


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--collab-config", default=os.path.join(os.path.dirname(__file__), "collab.yaml"))
    parser.add_argument("--output-dir", default=None, help="save the final model and metrics here")
    parser.add_argument("--max-steps", type=int, default=40, help="stop after this many collaborative steps")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per micro-batch per process")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=None, help="this peer's data order (default: random)")
    parser.add_argument("--min-peers", type=int, default=1, help="wait until this many peers are in the run")
    parser.add_argument("--wait-seconds", type=float, default=60.0, help="how long to wait for --min-peers")
    parser.add_argument("--log-every", type=int, default=10, help="print the loss every this many collaborative steps")
    return parser.parse_args()


def digits() -> tuple[torch.utils.data.TensorDataset, torch.utils.data.TensorDataset]:
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x / 16.0, y, test_size=0.2, random_state=0, stratify=y)

    def dataset(features, labels):
        return torch.utils.data.TensorDataset(torch.tensor(features, dtype=torch.float32), torch.tensor(labels))

    return dataset(x_train, y_train), dataset(x_test, y_test)


def wait_for_peers(optimizer, accelerator: Accelerator, min_peers: int, seconds: float) -> None:
    """Wait (main process) until the collaboration has ``min_peers`` peers; the other processes wait for it."""
    if optimizer.collaborative_optimizer is not None and min_peers > 1:
        tracker = optimizer.collaborative_optimizer.tracker
        deadline = time.monotonic() + seconds
        while tracker.fetch_now(timeout=5).num_peers < min_peers:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {min_peers} peers joined within {seconds:g} s")
            time.sleep(0.1)
    accelerator.wait_for_everyone()


def serve_stragglers(optimizer, step: int, seconds: float = 30.0) -> None:
    """Before leaving, stay (serving the state) until every peer seen is at ``step`` or left, at most ``seconds``."""
    if optimizer.collaborative_optimizer is None:
        return
    tracker = optimizer.collaborative_optimizer.tracker
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(peer.step < step for peer in tracker.fetch_now(timeout=5).peers):
        time.sleep(0.1)


def main() -> None:
    args = parse_args()
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps)
    collab = CollaborativeConfig.from_yaml(args.collab_config)  # + COLLAB_* environment variables

    train_set, test_set = digits()
    generator = torch.Generator()
    generator.manual_seed(args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little"))
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True, generator=generator)
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=256)

    torch.manual_seed(0)  # every peer starts from the same model (a joining peer downloads the current one anyway)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1.0 + 0.05 * step))  # slow decay

    optimizer, scheduler = prepare_collaborative(accelerator, optimizer, scheduler, config=collab)
    model, optimizer, train_loader, test_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, test_loader, scheduler
    )
    wait_for_peers(optimizer, accelerator, args.min_peers, args.wait_seconds)

    loss_fn = torch.nn.CrossEntropyLoss()
    while optimizer.collaborative_step < args.max_steps:
        model.train()
        for x, y in train_loader:
            with accelerator.accumulate(model):
                loss = loss_fn(model(x), y)
                accelerator.backward(loss)
                optimizer.step(loss=loss)  # the loss is published for collab monitor
                scheduler.step()
                optimizer.zero_grad()
            step = optimizer.collaborative_step
            if not optimizer.step_was_skipped and (step % args.log_every == 0 or step >= args.max_steps):
                if accelerator.is_main_process:  # tqdm.write keeps the progress bar intact
                    tqdm.write(f"step {step}: loss {loss.item():.3f}")
            if step >= args.max_steps:
                break
    optimizer.close_progress_bar()  # its final state, before anything else is printed

    model.eval()
    accuracy = MulticlassAccuracy(num_classes=10, average="micro").to(accelerator.device)
    with torch.no_grad():
        for x, y in test_loader:
            predictions, targets = accelerator.gather_for_metrics((model(x).argmax(dim=-1), y))
            accuracy.update(predictions, targets)
    result = {
        "collaborative_step": optimizer.collaborative_step,
        "algorithm": collab.algorithm,
        "num_peers": optimizer.num_peers,
        "test_accuracy": accuracy.compute().item(),
    }
    accelerator.print(f"finished: {json.dumps(result)}")
    if args.output_dir is not None:
        accelerator.save_model(model, args.output_dir)  # model.safetensors
        if accelerator.is_main_process:
            with open(os.path.join(args.output_dir, "metrics.json"), "w", encoding="utf-8") as file:
                json.dump(result, file)
    serve_stragglers(optimizer, optimizer.collaborative_step)
    accelerator.wait_for_everyone()
    optimizer.shutdown()
    accelerator.end_training()


if __name__ == "__main__":
    main()
