"""One peer of workload W7 (DiLoCo vs gradient mode): ``python -m bench.w7_peer ...``, started by :mod:`bench.w7`.

It trains the W1 MLP (random data) or a small character-level language model (on the Python standard library's own
source files: no download), with ``CollaborativeOptimizer`` (``--algorithm gradient``) or ``DiLoCoOptimizer``
(``--algorithm diloco``; settings from ``COLLAB_*``), until the collaboration took ``--steps`` collaborative (outer)
steps. It counts the bytes its averager sends: every all-reduce message (its parts for the other peers' reducers and
the averaged parts it returns to them) as hivemind serialises it (protobuf payload; libp2p framing and the DHT's small
records are not counted). It writes what :mod:`bench.w7` reports to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
import sysconfig
import time
from pathlib import Path

import torch
from hivemind.averaging.allreduce import AllReduceRunner

from bench.model import Batches, make_mlp, make_sgd
from collab_core import CollaborativeOptimizer, CollaborativeSettings, DiLoCoOptimizer, start_dht
from tests.support.barrier import barrier

#: bytes sent by this peer's averager (a forked process: shared memory, created before the fork)
SENT_BYTES = multiprocessing.Value("q", 0)
CONTEXT, EMBEDDING, HIDDEN, VOCAB = 32, 32, 256, 256
CORPUS_BYTES = 3_000_000
VALIDATION_WINDOWS = 2048


def count_sent_bytes() -> None:
    """Count every message the averager sends in an all-reduce (patched before the averager process forks)."""
    generate, accumulate = AllReduceRunner._generate_input_for_peer, AllReduceRunner._accumulate_parts_streaming

    async def counted_generate(self, peer_index):
        async for message in generate(self, peer_index):
            with SENT_BYTES.get_lock():
                SENT_BYTES.value += message.ByteSize()
            yield message

    async def counted_accumulate(self, stream, sender_index):
        async for message in accumulate(self, stream, sender_index):
            with SENT_BYTES.get_lock():
                SENT_BYTES.value += message.ByteSize()
            yield message

    AllReduceRunner._generate_input_for_peer = counted_generate
    AllReduceRunner._accumulate_parts_streaming = counted_accumulate


# ---------------------------------------------------------------------- the character-level language model


def corpus() -> torch.Tensor:
    """The bytes of the standard library's ``.py`` files (sorted by path), the first ``CORPUS_BYTES`` of them."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= CORPUS_BYTES:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:CORPUS_BYTES]), dtype=torch.uint8).long()


class CharModel(torch.nn.Module):
    """Next byte from the previous ``CONTEXT`` bytes: embedding, one hidden layer (about 330k parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, EMBEDDING)
        self.hidden = torch.nn.Linear(CONTEXT * EMBEDDING, HIDDEN)
        self.out = torch.nn.Linear(HIDDEN, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(self.embed(x).flatten(1))))


class TextBatches:
    """Random windows of the training part (90%), seeded by the peer's index: the same samples in every mode."""

    def __init__(self, text: torch.Tensor, peer_index: int, batch_size: int):
        self.text, self.batch_size = text[: int(0.9 * len(text))], batch_size
        self.generator = torch.Generator().manual_seed(5000 + peer_index)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(self.text) - CONTEXT - 1, (self.batch_size,), generator=self.generator)
        windows = torch.stack([self.text[s : s + CONTEXT + 1] for s in starts.tolist()])
        return windows[:, :CONTEXT], windows[:, CONTEXT]


@torch.no_grad()
def validation_loss(model: torch.nn.Module, text: torch.Tensor) -> float:
    """Mean cross-entropy (nats per byte) on fixed windows of the held-out last 10%."""
    held_out = text[int(0.9 * len(text)) :]
    step = (len(held_out) - CONTEXT - 1) // VALIDATION_WINDOWS
    windows = torch.stack([held_out[i * step : i * step + CONTEXT + 1] for i in range(VALIDATION_WINDOWS)])
    return float(torch.nn.functional.cross_entropy(model(windows[:, :CONTEXT]), windows[:, CONTEXT]))


# ---------------------------------------------------------------------- the peer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--index", type=int, required=True, help="seeds this peer's data")
    parser.add_argument("--peers", type=int, required=True, help="peers at the start and finish barriers")
    parser.add_argument("--algorithm", choices=("gradient", "diloco"), required=True)
    parser.add_argument("--model", choices=("w1", "charlm"), required=True)
    parser.add_argument("--steps", type=int, required=True, help="collaborative (outer) steps to take")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3, help="charlm: AdamW's learning rate (inner, in DiLoCo)")
    parser.add_argument("--barrier-key", required=True)
    parser.add_argument("--pad", type=float, default=0.03, help="pad each micro-batch to this many seconds")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    count_sent_bytes()
    settings = CollaborativeSettings.resolve()  # COLLAB_* from the harness
    dht, _hint = start_dht(settings, print_hint=False)
    text = None
    if args.model == "w1":
        model = make_mlp(0)
        opt = make_sgd(model.parameters())
        batches = Batches(args.index, args.batch_size)
    else:
        text = corpus()
        torch.manual_seed(0)
        model = CharModel()
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
        batches = TextBatches(text, args.index, args.batch_size)
    kwargs = settings.optimizer_kwargs()
    if args.algorithm == "diloco":
        collab = DiLoCoOptimizer(opt, dht=dht, **settings.outer_kwargs(), **kwargs)
    else:
        collab = CollaborativeOptimizer(opt, dht=dht, **kwargs)
    barrier(dht, f"{args.barrier_key}_start", args.name, args.peers, timeout=120)
    collab.tracker.fetch_now(timeout=5)
    started, samples, calls = time.monotonic(), 0, 0
    while collab.local_step < args.steps:
        began = time.perf_counter()
        x, y = batches.next()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        time.sleep(max(0.0, args.pad - (time.perf_counter() - began)))  # the same compute time on every peer
        collab.step(batch_size=len(x))
        samples, calls = samples + len(x), calls + 1
    seconds = time.monotonic() - started
    sent = SENT_BYTES.value
    record = dict(
        name=args.name,
        algorithm=args.algorithm,
        model=args.model,
        steps=collab.local_step,
        calls=calls,
        samples=samples,
        sent_bytes=sent,
        bytes_per_sample=sent / max(samples, 1),
        seconds=seconds,
        parameters=sum(p.numel() for p in model.parameters()),
        downloads=collab.collaboration_state.state_downloads,
        failed_rounds=collab.collaboration_state.failed_rounds,
        validation_loss=validation_loss(model, text) if text is not None else math.nan,
    )
    Path(args.out).write_text(json.dumps(record))
    barrier(dht, f"{args.barrier_key}_finish", args.name, args.peers, timeout=120)
    collab.shutdown()
    dht.shutdown()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
