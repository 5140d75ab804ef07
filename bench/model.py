"""The model, data and padded compute shared by every side of a workload (same seeds everywhere)."""

from __future__ import annotations

import time

import torch

#: W1's MLP: 512-1024-512-10 (1,055,242 parameters)
MLP_SIZES = (512, 1024, 512, 10)
LR, MOMENTUM = 0.05, 0.9


def make_mlp(seed: int = 0) -> torch.nn.Module:
    """W1's MLP with the same initialisation in every process."""
    torch.manual_seed(seed)
    a, b, c, d = MLP_SIZES
    return torch.nn.Sequential(
        torch.nn.Linear(a, b), torch.nn.ReLU(), torch.nn.Linear(b, c), torch.nn.ReLU(), torch.nn.Linear(c, d)
    )


def make_flat(num_params: int, seed: int = 0) -> torch.nn.Module:
    """W3's model: ``num_params`` float32 parameters in 1M-element tensors (nothing is computed with it)."""
    torch.manual_seed(seed)
    chunk = 1_000_000
    sizes = [chunk] * (num_params // chunk) + ([num_params % chunk] if num_params % chunk else [])
    return torch.nn.ParameterList([torch.nn.Parameter(torch.randn(size) * 0.01) for size in sizes])


def make_sgd(params) -> torch.optim.Optimizer:
    """SGD lr 0.05, momentum 0.9 (W1)."""
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)


class Batches:
    """Deterministic random batches of one peer (seeded by its index)."""

    def __init__(self, peer_index: int, batch_size: int):
        self.generator = torch.Generator().manual_seed(1000 + peer_index)
        self.batch_size = batch_size

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``(x, y)`` batch."""
        x = torch.randn(self.batch_size, MLP_SIZES[0], generator=self.generator)
        y = torch.randint(0, MLP_SIZES[-1], (self.batch_size,), generator=self.generator)
        return x, y


def compute(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor], pad_to: float) -> float:
    """Forward and backward of one micro-batch, padded with a sleep to ``pad_to`` seconds; returns its duration."""
    started = time.perf_counter()
    x, y = batch
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    remaining = pad_to - (time.perf_counter() - started)
    if remaining > 0:
        time.sleep(remaining)
    return time.perf_counter() - started


def max_param_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """The largest absolute difference between two peers' parameters."""
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))
