"""One peer of the Accelerate tests: an ordinary Accelerate training script that joins a collaboration.

Started with ``accelerate launch`` (one or several local processes) or plain ``python``. Every process writes what
the tests check to ``--out`` + ``.rank<process index>`` (a torch file): the sample indices of every micro-batch with
the collaborative step it was computed at (for the single-process replay), per call whether it was a sync step,
whether the parameters changed and what ``step_was_skipped`` said, the learning rate each update used, the final
parameters, scheduler state and counters. The main process also records which peers took part in each step.
Peers meet at a start and a finish barrier (DHT records), so none starts before the others exist or leaves while
they may still average with it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.tracking import GeneralTracker

from accelerate_collab import CollaborativeConfig, prepare_collaborative
from tests.support.barrier import barrier as shared_barrier

BARRIER_TIMEOUT = 90.0
FEATURES, CLASSES = 8, 4


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, 16), torch.nn.Tanh(), torch.nn.Linear(16, CLASSES))


def make_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def make_scheduler(opt: torch.optim.Optimizer):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))


def make_data(seed: int, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, FEATURES, generator=generator)
    y = torch.randint(0, CLASSES, (samples,), generator=generator)
    return x, y


class RecordingTracker(GeneralTracker):
    """An Accelerate tracker that appends every ``log`` call to a JSON-lines file."""

    name = "recording"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values: dict) -> None:
        pass

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(json.dumps({"step": step, "values": values}) + "\n")


def barrier(dht, key: str, name: str, expected: int) -> None:
    """Wait (at most ``BARRIER_TIMEOUT`` s) until ``expected`` peers arrived at ``key`` (tests/support/barrier.py)."""
    shared_barrier(dht, key, name, expected, timeout=BARRIER_TIMEOUT)


def peer_barrier(accelerator: Accelerator, optimizer, key: str, name: str, expected: int) -> None:
    """All peers (through the DHT of each peer's main process), then all local processes of this peer."""
    if optimizer.collaborative_optimizer is not None and expected > 0:
        barrier(optimizer.collaborative_optimizer.dht, key, name, expected)
    accelerator.wait_for_everyone()


def overflow_hook(model: torch.nn.Module, state: dict, at_step: int) -> None:
    """Test hook: make this process's gradient of one micro-batch at collaborative step ``at_step`` infinite."""

    def hook(grad: torch.Tensor) -> torch.Tensor:
        if state["step"] == at_step and not state["done"]:
            state["done"] = True
            return torch.full_like(grad, float("inf"))
        return grad

    next(model.parameters()).register_hook(hook)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--collab-config", default=None, help="collab.yaml (COLLAB_* variables override it)")
    parser.add_argument("--peers", type=int, default=1, help="peers at the start barrier (0: no barrier)")
    parser.add_argument("--finish-peers", type=int, default=None, help="peers at the finish barrier")
    parser.add_argument("--steps", type=int, required=True, help="train until this collaborative step")
    parser.add_argument("--batch-size", type=int, required=True, help="dataloader batch size")
    parser.add_argument("--samples", type=int, default=192, help="dataset size (one epoch)")
    parser.add_argument("--data-seed", type=int, required=True)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--split-batches", action="store_true")
    parser.add_argument("--mixed-precision", default="no")
    parser.add_argument("--cpu-fp16-scaler", type=float, default=0.0, help="emulate fp16 AMP on CPU: initial scale")
    parser.add_argument("--overflow-at-step", type=int, default=-1, help="inject an inf gradient at this step")
    parser.add_argument("--no-scheduler", action="store_true")
    parser.add_argument("--no-zero-grad", action="store_true", help="never call optimizer.zero_grad()")
    parser.add_argument("--tracker-log", default=None, help="initialise a recording tracker writing here")
    parser.add_argument("--save-state-at", type=int, default=-1, help="accelerator.save_state at this step and stop")
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--resume", action="store_true", help="accelerator.load_state(--checkpoint-dir) first")
    parser.add_argument("--join-at-step", type=int, default=0, help="start training once the collaboration is here")
    parser.add_argument("--compute-seconds", type=float, default=0.0, help="simulated compute per micro-batch")
    args = parser.parse_args()

    accelerator = Accelerator(
        gradient_accumulation_steps=args.grad_accum,
        mixed_precision=args.mixed_precision,
        dataloader_config=DataLoaderConfiguration(split_batches=args.split_batches),
        log_with=[RecordingTracker(args.tracker_log)] if args.tracker_log else None,
    )
    if args.cpu_fp16_scaler:
        # Accelerate makes no GradScaler on CPU (fp16 AMP is GPU-only there); torch has a CPU GradScaler and fp16
        # autocast on CPU, so the GPU code path is emulated: the scaler accelerator.backward uses, and autocast
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=args.cpu_fp16_scaler, growth_interval=1000)
        accelerator.native_amp = True
    if args.tracker_log:
        accelerator.init_trackers("collab-test")
    config = CollaborativeConfig.from_yaml(args.collab_config) if args.collab_config else CollaborativeConfig.from_env()

    model = make_model(0)
    optimizer = make_optimizer(model.parameters())
    scheduler = None if args.no_scheduler else make_scheduler(optimizer)
    optimizer, scheduler = prepare_collaborative(accelerator, optimizer, scheduler, config=config)

    x, y = make_data(args.data_seed, args.samples)
    dataset = torch.utils.data.TensorDataset(torch.arange(args.samples), x, y)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False)
    if scheduler is not None:
        model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    else:
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    prepared_is_ours = type(optimizer).__name__ == "CollaborativeAcceleratedOptimizer" and (
        scheduler is None or type(scheduler).__name__ == "CollaborativeAcceleratedScheduler"
    )
    if args.resume:
        accelerator.load_state(args.checkpoint_dir)
    step_after_resume = optimizer.collaborative_step

    hook_state = {"step": -1, "done": False}
    if args.overflow_at_step >= 0 and accelerator.is_main_process:
        overflow_hook(accelerator.unwrap_model(model), hook_state, args.overflow_at_step)

    collaborative = optimizer.collaborative_optimizer
    peer_barrier(accelerator, optimizer, f"{config.run_id}_test_start", args.name, args.peers)
    if collaborative is not None:
        collaborative.tracker.fetch_now(timeout=5)  # see the peers that met at the barrier before the first step
        while args.join_at_step and collaborative.tracker.fetch_now(timeout=5).epoch < args.join_at_step:
            time.sleep(0.05)
    accelerator.wait_for_everyone()

    loss_fn = torch.nn.CrossEntropyLoss()
    calls: list[dict] = []
    micro_batches: list[tuple[int, torch.Tensor]] = []
    lrs_used: dict[int, float] = {}
    participants: dict[int, list[str]] = {}
    contributions: dict[int, dict[str, int]] = {}
    round_samples: dict[int, int] = {}
    scales: list[float] = []
    started = time.monotonic()
    done = False
    while not done:
        for index, batch_x, batch_y in loader:
            step_before = optimizer.collaborative_step
            hook_state["step"] = step_before
            lr_before = optimizer.param_groups[0]["lr"]
            params_before = [p.detach().clone() for p in model.parameters()]
            downloads_before = collaborative.collaboration_state.state_downloads if collaborative else 0
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    logits = model(batch_x)
                loss = loss_fn(logits.float(), batch_y)
                accelerator.backward(loss)
                grads_before_step = [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters()]
                sync = accelerator.sync_gradients
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                if not args.no_zero_grad:
                    optimizer.zero_grad()
            time.sleep(args.compute_seconds)
            changed = any(not torch.equal(a, b) for a, b in zip(params_before, model.parameters(), strict=True))
            downloaded = bool(collaborative and collaborative.collaboration_state.state_downloads != downloads_before)
            micro_batches.append((step_before, index.clone()))
            if accelerator.scaler is not None:
                scales.append(float(accelerator.scaler.get_scale()))
            calls.append(
                {
                    "step_before": step_before,
                    "step_after": optimizer.collaborative_step,
                    "sync": sync,
                    "params_changed": changed,
                    "skipped": optimizer.step_was_skipped,
                    "accelerator_skipped": accelerator.optimizer_step_was_skipped,
                    "downloaded": downloaded,
                    "had_grads": any(grads_before_step),
                    "finite": all(torch.isfinite(p).all().item() for p in model.parameters()),
                }
            )
            if collaborative is not None:  # a step taken (an update, or an fp16 overflow step skipped by all)
                took_step = optimizer.collaborative_step != step_before and not calls[-1]["downloaded"]
            else:  # the other local processes only know whether there was an update
                took_step = not optimizer.step_was_skipped
            if took_step:
                lrs_used[step_before] = lr_before
                if collaborative is not None:
                    state = collaborative.collaboration_state
                    participants[step_before] = list(state.last_round_participants)
                    contributions[step_before] = dict(state.last_round_contributions)
                    round_samples[step_before] = state.last_round_samples
            if args.save_state_at >= 0 and optimizer.collaborative_step >= args.save_state_at:
                accelerator.save_state(args.checkpoint_dir)
                done = True
                break
            if optimizer.collaborative_step >= args.steps:
                done = True
                break

    unwrapped = accelerator.unwrap_model(model)
    state = collaborative.collaboration_state if collaborative is not None else None
    result = {
        "name": args.name,
        "rank": accelerator.process_index,
        "num_processes": accelerator.num_processes,
        "is_main": accelerator.is_main_process,
        "has_dht": collaborative is not None,
        "prepared_is_ours": prepared_is_ours,
        "collaborative_step": optimizer.collaborative_step,
        "step_after_resume": step_after_resume,
        "num_peers": optimizer.num_peers,
        "calls": calls,
        "micro_batches": micro_batches,
        "lrs_used": lrs_used,
        "participants": participants,
        "contributions": contributions,
        "round_samples": round_samples,
        "scales": scales,
        "final_params": [p.detach().clone().float() for p in unwrapped.parameters()],
        "param_dtypes": [str(p.dtype) for p in unwrapped.parameters()],
        "final_lr": optimizer.param_groups[0]["lr"],
        "scheduler_state": scheduler.state_dict() if scheduler is not None else None,
        "optimizer_state": optimizer.state_dict(),
        "collaboration_state": state.__dict__ if state is not None else None,
        "peer_id": collaborative.dht.peer_id.to_base58() if collaborative is not None else None,
        "client_mode": collaborative.client_mode if collaborative is not None else None,
        "seconds": time.monotonic() - started,
    }
    out = f"{args.out}.rank{accelerator.process_index}"
    torch.save(result, out + ".tmp")
    os.replace(out + ".tmp", out)
    finish = args.finish_peers if args.finish_peers is not None else args.peers
    peer_barrier(accelerator, optimizer, f"{config.run_id}_test_finish", args.name, finish)
    optimizer.shutdown()
    accelerator.end_training()
    print(f"{args.name} rank {accelerator.process_index}: done at step {optimizer.collaborative_step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
