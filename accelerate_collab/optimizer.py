"""The optimizer handed back to an Accelerate training loop: Accelerate's wrapper over a collaborative optimizer.

Like Accelerate's own ``AcceleratedOptimizer`` it steps only on sync steps of gradient accumulation, but a sync step
reports the micro-batches of all local processes to ``collab_core.CollaborativeOptimizer``, which updates the model
only when the whole collaboration has accumulated ``target_batch_size`` samples. It is marked prepared, so
``accelerator.prepare`` keeps it (no double wrapping) and registers it for ``save_state``/``load_state`` and
``accelerator.optimizer_step_was_skipped``.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate.optimizer import AcceleratedOptimizer

from accelerate_collab.batch import MicroBatchCounter
from accelerate_collab.metrics import ProgressReporter
from collab_core import CollaborativeOptimizer
from collab_core.follower import FollowerOptimizer
from collab_core.local_peer import LeaderOutcome, LocalGroup, LocalReplicas, leader_outcome
from collab_core.log import get_logger

logger = get_logger(__name__)


class CollaborativeAcceleratedOptimizer(AcceleratedOptimizer):
    """An optimizer whose ``step()`` contributes to a collaboration; created by ``prepare_collaborative``.

    On the main process ``.optimizer`` is the :class:`collab_core.CollaborativeOptimizer`; on the other local
    processes of the peer it is the user's optimizer, which is never stepped there: those processes receive the
    parameters from the main process after every change of the collaborative step.

    Args:
        optimizer: the user's PyTorch optimizer.
        collaborative: the collaborative optimizer over ``optimizer`` (main process), or None (other processes).
        scheduler: the user's learning-rate scheduler, or None.
        group: the local processes of this peer.
        counter: counts the samples behind each real optimizer step.
        reuse_grad_buffers: whether gradients are accumulated in ``param.grad`` (then ``zero_grad`` never clears).
        grad_scaler: Accelerate's gradient scaler (fp16), or None.
        reporter: progress bar and metrics (main process), or None.
        dht: a DHT started for this optimizer, shut down with it; None if the caller owns the DHT.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        collaborative: CollaborativeOptimizer | None,
        scheduler: Any | None,
        group: LocalGroup,
        counter: MicroBatchCounter,
        reuse_grad_buffers: bool,
        grad_scaler: Any | None = None,
        reporter: ProgressReporter | None = None,
        dht: Any | None = None,
    ) -> None:
        super().__init__(collaborative if collaborative is not None else optimizer, device_placement=False, scaler=None)
        self._is_accelerate_prepared = True
        self.collaborative_optimizer = collaborative
        self.local_optimizer = optimizer
        self.lr_scheduler = scheduler
        self.reuse_grad_buffers = reuse_grad_buffers
        self.grad_scaler = grad_scaler
        self._group, self._counter, self._reporter, self._dht = group, counter, reporter, dht
        self._replicas = LocalReplicas(group, optimizer, scheduler)  # the leader/follower protocol (collab_core)
        self._params = self._replicas.params
        #: the other local processes' bookkeeping (step, peers, gradient scale, checkpoints); None on the main one
        self._follower = (
            FollowerOptimizer(self._replicas, reuse_grad_buffers=reuse_grad_buffers, grad_scaler=grad_scaler)
            if collaborative is None
            else None
        )
        self._skipped = False
        self._closed = False

    # ------------------------------------------------------------------ public state

    @property
    def step_was_skipped(self) -> bool:
        """Whether the last ``step()`` call did *not* apply a collaborative update to the parameters.

        True on accumulation (non-sync) calls, on calls that only reported samples, on a step whose update was
        skipped (fp16 overflow, or inf/NaN in the averaged gradient) and on a call that downloaded the collaboration's
        state instead of stepping.
        """
        return self._skipped

    @property
    def collaborative_step(self) -> int:
        """Collaborative steps taken by this peer (the same on every local process)."""
        if self.collaborative_optimizer is not None:
            return self.collaborative_optimizer.local_step
        assert self._follower is not None
        return self._follower.local_step

    @property
    def num_peers(self) -> int:
        """Peers in the collaboration as last seen (this one included; one per ``accelerate launch``)."""
        if self.collaborative_optimizer is not None:
            return self.collaborative_optimizer.collaboration_state.num_peers
        assert self._follower is not None
        return self._follower.num_peers

    @property
    def is_collaborating_process(self) -> bool:
        """Whether this process talks to the collaboration (the main process of the peer)."""
        return self.collaborative_optimizer is not None

    # ------------------------------------------------------------------ the training loop

    def step(self, closure: Any = None, *, batch_size: int | None = None, loss: Any = None) -> Any:
        """Count this micro-batch; on a sync step, contribute the peer's gradients to the collaboration.

        Args:
            closure: optional, as in ``torch.optim.Optimizer.step``: called first to compute the loss and gradients.
            batch_size: samples of this micro-batch on this process; default: the ``batch_size`` setting, else the
                batch size of the prepared dataloader being iterated.
            loss: optional: this micro-batch's loss, published for ``collab monitor`` (see :meth:`record_loss`).

        Returns:
            The closure's loss, if a closure was given.
        """
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if loss is not None:
            self.record_loss(loss)
        self._counter.add(batch_size)
        if not self.gradient_state.sync_gradients:
            self._skipped = True  # accumulating: Accelerate's "step only on sync steps"
            return loss if closure is not None else None
        samples, micro_batches = self._counter.take()
        contribute = None
        if self.collaborative_optimizer is not None:

            def contribute(peer_samples: int) -> LeaderOutcome:
                return self._contribute(peer_samples, micro_batches)

        outcome = self._replicas.step(samples, contribute)  # parameters and LR state are the main process's now
        self._follow(outcome)
        self._skipped = not outcome.updated
        if self._reporter is not None:
            self._reporter.after_call(outcome.changed)
        return loss if closure is not None else None

    def record_loss(self, loss: Any) -> None:
        """Publish ``loss`` (a number or one-element tensor) as this peer's latest training loss, shown by
        ``collab monitor``. Only the main process's value is published (one peer per launch); a no-op elsewhere."""
        if self.collaborative_optimizer is not None:
            self.collaborative_optimizer.record_loss(loss)

    def zero_grad(self, set_to_none: bool | None = None) -> None:
        """Clear gradients on sync steps only; never with ``reuse_grad_buffers`` (they hold counted samples).

        ``step()`` already leaves ``param.grad`` empty after contributing it, so calling this is optional.
        """
        if not self.gradient_state.sync_gradients or self.reuse_grad_buffers:
            return
        self.local_optimizer.zero_grad(set_to_none=True if set_to_none is None else set_to_none)

    def _contribute(self, peer_samples: int, micro_batches: int) -> LeaderOutcome:
        """Main process: hand the peer's averaged gradient to the collaborative optimizer."""
        collaborative = self.collaborative_optimizer
        assert collaborative is not None
        accumulation_steps = self.gradient_state.num_steps
        if micro_batches < accumulation_steps and not self.reuse_grad_buffers:
            # accelerator.backward divided each loss by gradient_accumulation_steps, but fewer micro-batches came
            # (end of the dataloader): make param.grad the mean gradient of the samples that are reported
            with torch.no_grad():
                for param in self._params:
                    if param.grad is not None:
                        param.grad.mul_(accumulation_steps / micro_batches)
        collaborative.step(batch_size=peer_samples)
        scale = float(self.grad_scaler.get_scale()) if self.grad_scaler is not None else 0.0
        return leader_outcome(collaborative, scale)

    def _follow(self, outcome: LeaderOutcome) -> None:
        """The other local processes' bookkeeping after a sync step (their parameters are the main process's)."""
        if self._follower is not None:
            self._follower.follow(outcome)  # DDP averages scaled gradients: every process needs one scale

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Optimizer state, scheduler state and the collaborative step (``collab_core`` checkpoint format)."""
        if self.collaborative_optimizer is not None:
            return self.collaborative_optimizer.state_dict()
        assert self._follower is not None
        return self._follower.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a checkpoint made by :meth:`state_dict`, or a swarm backup (parameters too), on every process
        (``accelerator.load_state`` calls this)."""
        if self.collaborative_optimizer is not None:
            self.collaborative_optimizer.load_state_dict(state_dict)
            return
        assert self._follower is not None
        self._follower.load_state_dict(state_dict)  # a swarm backup restores the parameters too, as a download

    # ------------------------------------------------------------------ leaving

    def close_progress_bar(self) -> None:
        """Show the progress bar's final state and close it, e.g. before printing a summary (idempotent; a no-op on
        the other local processes and with ``progress_bar=False``). :meth:`shutdown` closes it too."""
        if self._reporter is not None:
            self._reporter.close()

    def shutdown(self) -> None:
        """Leave the collaboration (progress bar, averager, and the DHT if ``prepare_collaborative`` started it).

        Idempotent; also registered to run at interpreter exit. ``state_dict()`` keeps working afterwards.
        """
        if self._closed:
            return
        self._closed = True
        if self._reporter is not None:
            self._reporter.close()
        try:
            if self.collaborative_optimizer is not None:
                self.collaborative_optimizer.shutdown()
        finally:
            if self._dht is not None:
                self._dht.shutdown()

    def __repr__(self) -> str:
        role = "main" if self.collaborative_optimizer is not None else "follower"
        step = self.collaborative_step
        return f"{type(self).__name__}({role}, collaborative_step={step}, opt={self.local_optimizer!r})"


__all__ = ["CollaborativeAcceleratedOptimizer"]
