"""One benchmark peer: a separate OS process started by the harness (``python -m bench.peer ...``).

It builds one side (``ours``, ``raw``, ``plain``, ``lightning`` or ``accelerate``), meets the other peers at a start
barrier (DHT records), trains until the collaboration reaches ``--steps`` collaborative steps, records every
``step()`` call and all-reduce (see :mod:`bench.recorder`), and meets the others at a finish barrier, so that no
peer leaves while another may still be averaging with it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from hivemind.utils import get_dht_time

from bench import probes
from bench.model import Batches, compute, make_flat, make_mlp
from bench.recorder import Recorder
from bench.sides import Side, build_ours, build_plain, build_raw
from tests.support.barrier import barrier


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--side", choices=("ours", "raw", "plain", "lightning", "accelerate"), required=True)
    parser.add_argument("--workload", choices=("train", "allreduce"), default="train")
    parser.add_argument("--name", required=True)
    parser.add_argument("--index", type=int, required=True, help="seeds this peer's data")
    parser.add_argument("--out", required=True, help="JSON record (parameters go to OUT.pt)")
    parser.add_argument("--steps", type=int, required=True, help="train until this collaborative step")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--pad", type=float, default=0.1, help="pad each micro-batch to this many seconds")
    parser.add_argument("--peers", type=int, default=1, help="peers at the start barrier (0: none)")
    parser.add_argument("--finish-peers", type=int, default=1, help="peers at the finish barrier")
    parser.add_argument("--accumulation", type=int, default=8, help="plain side: micro-batches per opt.step()")
    parser.add_argument("--num-params", type=int, default=25_000_000, help="allreduce workload: model size")
    parser.add_argument("--mark-at-step", type=int, default=-1, help="touch --mark-file at this step")
    parser.add_argument("--mark-file", default="")
    parser.add_argument("--run-id", default="bench", help="barrier key prefix")
    parser.add_argument(
        "--stop-after-shared",
        type=int,
        default=-1,
        help="announce (in the DHT) a last step this many steps after this peer's first shared step; every peer "
        "with --steps -1 stops there",
    )
    return parser.parse_args(argv)


def build(args: argparse.Namespace, model: torch.nn.Module, recorder: Recorder) -> Side:
    if args.side == "ours":
        return build_ours(model, recorder)
    if args.side == "raw":
        return build_raw(model, recorder)
    return build_plain(model, args.accumulation)


class StopStep:
    """The step to stop at: ``--steps``, or (with ``--steps -1``) the one announced in the DHT by the joiner."""

    def __init__(self, args: argparse.Namespace, side: Side, recorder: Recorder):
        self.args, self.side, self.recorder = args, side, recorder
        self.key = f"{args.run_id}_stop_at"
        self.value: int | None = args.steps if args.steps >= 0 else None
        self.seen_rounds = 0

    def reached(self, step: int) -> bool:
        return self.value is not None and step >= self.value

    def after_step(self, step: int) -> None:
        """Called when this peer took a step: announce or look up the stop step if it is not known yet."""
        if self.value is not None or self.side.dht is None:
            return
        if self.args.stop_after_shared >= 0:
            shared = any(r["group"] >= 2 and r["ok"] for r in self.recorder.rounds[self.seen_rounds :])
            self.seen_rounds = len(self.recorder.rounds)
            if shared:
                self.value = step + self.args.stop_after_shared
                self.side.dht.store(self.key, value=self.value, expiration_time=get_dht_time() + 600)
            return
        found = self.side.dht.get(self.key, latest=True)
        if found is not None and isinstance(found.value, int):
            self.value = found.value


def train(args: argparse.Namespace, side: Side, model: torch.nn.Module, recorder: Recorder) -> None:
    """The measured loop: padded compute, then ``step()``; one record per call."""
    batches = Batches(args.index, args.batch_size)
    flat = args.workload == "allreduce"
    marked = False
    stop = StopStep(args, side, recorder)
    while not stop.reached(side.collaborative_step()):
        t0 = time.time()
        if flat:  # no compute: every parameter gets a constant gradient (values do not matter for throughput)
            for param in model.parameters():
                if param.grad is None:
                    param.grad = torch.full_like(param, 0.01 * (args.index + 1))
        else:
            compute(model, batches.next(), args.pad)
        t_step = time.time()
        before = side.collaborative_step()
        side.step(args.batch_size)
        after = side.collaborative_step()
        recorder.call(t0, t_step, time.time(), before, after)
        if after != before:
            stop.after_step(after)
        if not marked and args.mark_file and side.collaborative_step() >= args.mark_at_step:
            Path(args.mark_file).touch()
            marked = True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    recorder = Recorder(args.name, args.side, args.out)
    torch.set_num_threads(1)  # peers share 2 cores: one compute thread each, the same on every side
    probes.install_round_probe()
    if args.side in ("lightning", "accelerate"):
        from bench import frontends

        return frontends.run(args, recorder)
    model = make_flat(args.num_params) if args.workload == "allreduce" else make_mlp()
    side = build(args, model, recorder)
    recorder.extra["ready_at"] = time.time()
    if side.dht is not None and args.peers > 0:
        barrier(side.dht, f"{args.run_id}_start", args.name, args.peers)
        side.after_barrier()
    recorder.extra["started_training_at"] = time.time()
    train(args, side, model, recorder)
    recorder.extra["state"] = side.info()
    recorder.save(list(model.parameters()))
    if side.dht is not None and args.finish_peers > 0:
        barrier(side.dht, f"{args.run_id}_finish", args.name, args.finish_peers)
    side.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
