"""How many samples one ``optimizer.step()`` call stands for, without the user passing it.

With Accelerate, ``optimizer.step()`` is called once per micro-batch on every process, but a real (synchronised)
optimizer step happens only every ``gradient_accumulation_steps`` calls, after DDP averaged the gradients of all
local processes. The collaborative optimizer must be told the samples behind that averaged gradient:
micro-batch size x micro-batches since the last real step, summed over the local processes.
"""

from __future__ import annotations

from typing import Any

from accelerate.state import GradientState

from collab_core import CollaborativeConfigError


def _per_process_batch_size(dataloader: Any, num_processes: int) -> int | None:
    """Samples one process gets per batch from a dataloader prepared by ``accelerator.prepare``, if known."""
    total = getattr(dataloader, "total_batch_size", None)  # DataLoaderShard / DataLoaderDispatcher
    if not isinstance(total, int) or total <= 0:
        return None
    return max(1, total // num_processes)


class MicroBatchCounter:
    """Counts this process's samples since the last real optimizer step.

    The size of each micro-batch comes from, in this order: ``batch_size`` passed to ``optimizer.step()``; the
    ``batch_size`` setting; the prepared dataloader being iterated (its ``total_batch_size`` divided by the number of
    processes, right both with and without ``split_batches``).

    Args:
        num_processes: processes of this peer (``accelerator.num_processes``).
        configured: the ``batch_size`` setting (samples per micro-batch per process), or None.
    """

    def __init__(self, num_processes: int, configured: int | None) -> None:
        self.num_processes = num_processes
        self.configured = configured
        self.gradient_state = GradientState()
        self.samples = 0
        self.micro_batches = 0

    def add(self, batch_size: int | None = None) -> int:
        """Count one micro-batch of this process; returns its size."""
        size = self._resolve(batch_size)
        self.samples += size
        self.micro_batches += 1
        return size

    def take(self) -> tuple[int, int]:
        """Return ``(samples, micro_batches)`` counted since the last call, and start counting afresh."""
        counted = self.samples, self.micro_batches
        self.samples = self.micro_batches = 0
        return counted

    def _resolve(self, batch_size: int | None) -> int:
        if batch_size is not None:
            if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
                raise ValueError(f"optimizer.step(batch_size=...) must be a positive integer, got {batch_size!r}")
            return batch_size
        if self.configured is not None:
            return self.configured
        inferred = _per_process_batch_size(self.gradient_state.active_dataloader, self.num_processes)
        if inferred is None:
            raise CollaborativeConfigError(
                "batch_size: cannot tell how many samples this optimizer.step() call stands for: no dataloader "
                "prepared by accelerator.prepare() is being iterated and the batch_size setting is unset. Iterate a "
                "prepared dataloader, set batch_size (samples per micro-batch per process) in collab.yaml or "
                "COLLAB_BATCH_SIZE, or call optimizer.step(batch_size=<samples in this micro-batch>).",
                setting="batch_size",
            )
        return inferred


__all__ = ["MicroBatchCounter"]
