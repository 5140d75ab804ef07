"""``Trainer(strategy="collaborative", devices=N)``: N local processes (DDP inside the machine) as one peer.

Lightning builds a strategy given by name before it knows the devices and sets ``parallel_devices`` afterwards. When
it sets more than one, :class:`~lightning_collab.strategy.CollaborativeStrategyMixin` becomes this namespace's
multi-device class (:meth:`MultiDeviceCollaborativeMixin.adopt`), which is the same mixin on top of Lightning's
``DDPStrategy``: Lightning then starts the other local processes (its subprocess launcher), creates the local process
group (gloo on CPU, NCCL on GPU), wraps the model in ``DistributedDataParallel`` and gives each process its shard of
the data. The single-device path is not involved at all.

Around each optimizer step the leader/follower protocol of :mod:`collab_core.local_peer` (shared with the Accelerate
wrapper) keeps the processes identical: every process runs the closure (forward and backward: DDP averages the
gradients of the local processes), then local rank 0 alone reports the samples of all processes to its
``CollaborativeOptimizer`` (the only DHT node and averager of the peer), and broadcasts parameters, learning rates and
scheduler state whenever the collaborative step changed (an update or a state download) or a DiLoCo inner step moved
the parameters. The other processes hold a :class:`collab_core.follower.FollowerOptimizer`. torch.distributed is used
only over the local process group; hivemind does all networking between peers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from typing_extensions import override

from collab_core.follower import FollowerOptimizer
from collab_core.join import Membership, join
from collab_core.local_peer import LeaderOutcome, LocalGroup, LocalReplicas, leader_outcome
from lightning_collab.strategy import CollaborativeStrategyMixin


class MultiDeviceCollaborativeMixin(CollaborativeStrategyMixin):
    """The collaborative strategy with several local processes; mixed into this namespace's ``DDPStrategy``.

    Not constructed directly: ``Trainer(strategy="collaborative", devices=N)`` (or a ``CollaborativeStrategy``
    instance with ``devices=N``) turns the strategy into it once Lightning knows the devices. ``collaborative_step``,
    ``num_peers`` and checkpoints are the same on every local process; ``collaborative_optimizer``, ``dht`` and
    ``join_hint`` exist on local rank 0 only (None on the others).
    """

    _group: LocalGroup | None
    _replicas: LocalReplicas | None
    _follower: FollowerOptimizer | None

    @classmethod
    def adopt(cls, strategy: CollaborativeStrategyMixin, devices: list[torch.device]) -> None:
        """Turn the single-device ``strategy`` (built, not yet set up) into this class, with ``devices``.

        Lightning's accelerator connector holds the strategy it built from the registry name; it sets the devices
        (this call), then ``num_nodes``, the ranks and the launcher on that same object.
        """
        environment = strategy.cluster_environment  # the connector's choice (see CollaborativeStrategyMixin)
        for name in ("global_rank", "local_rank", "world_size", "_root_device"):  # DDP computes these
            vars(strategy).pop(name, None)
        strategy.__class__ = cls
        ddp_strategy: Any = cls._lightning.DDPStrategy
        ddp_strategy.__init__(
            strategy,
            accelerator=strategy._accelerator,
            parallel_devices=devices,
            cluster_environment=environment,
            checkpoint_io=strategy._checkpoint_io,
            precision_plugin=strategy._precision_plugin,
        )
        assert isinstance(strategy, MultiDeviceCollaborativeMixin)
        strategy._group = strategy._replicas = strategy._follower = None

    # ------------------------------------------------------------------ what users read

    @property
    @override
    def collaborative_step(self) -> int:
        """Collaborative steps this peer has taken (the same on every local process); 0 before ``fit``."""
        if self._follower is not None:
            return self._follower.local_step
        return super().collaborative_step

    @property
    @override
    def num_peers(self) -> int:
        """Peers in the collaboration, this one included (as local rank 0 last saw it); 0 before ``fit``."""
        if self._follower is not None:
            return self._follower.num_peers
        return super().num_peers

    @override
    def wait_for_peers(self, num_peers: int, timeout: float = 300.0) -> int:
        """As with one device, on local rank 0; the other local processes return at once (they wait for rank 0 in
        their next optimizer step)."""
        if self._follower is not None:
            return self._follower.num_peers
        return super().wait_for_peers(num_peers, timeout)

    # ------------------------------------------------------------------ devices

    @property  # type: ignore[override]
    @override
    def parallel_devices(self) -> list[torch.device] | None:
        """The devices of this peer's local processes, one each."""
        return self._parallel_devices

    @parallel_devices.setter
    def parallel_devices(self, devices: list[torch.device] | None) -> None:
        self._parallel_devices = devices

    @property
    def num_nodes(self) -> int:
        """Always 1: one peer is one machine (start one peer per machine)."""
        return 1

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:
        if num_nodes != 1:
            raise self._lightning.MisconfigurationException(
                f"strategy='collaborative' makes the processes of one machine one peer, but Trainer(num_nodes="
                f"{num_nodes}) was given. Set num_nodes=1 and start one peer per machine: the machines then train "
                "together through the collaboration."
            )

    # ------------------------------------------------------------------ lifecycle

    @override
    def _join_collaboration(self, trainer: Any) -> None:
        optimizer = self._single_optimizer()
        scheduler = self._single_scheduler()
        self._grad_scaler = self._fp16_scaler(trainer)
        backend = dist.get_backend()
        group = LocalGroup(
            self.world_size, self.is_global_zero, self.root_device if backend == "nccl" else torch.device("cpu")
        )
        self._group = group
        self._replicas = LocalReplicas(group, optimizer, scheduler)
        previous_follower = self._follower
        self._follower = None

        def join_on_rank_zero() -> Membership:
            return join(optimizer, self.settings, scheduler=scheduler, grad_scaler=self._grad_scaler, print_hint=False)

        membership = group.run_on_leader(join_on_rank_zero, "join the collaboration")
        if membership is not None:
            self._joined(membership)
            return
        follower = FollowerOptimizer(
            self._replicas, reuse_grad_buffers=self.settings.reuse_grad_buffers, grad_scaler=self._grad_scaler
        )
        if previous_follower is not None:  # a second fit: continue at the step of the first (as on rank 0)
            follower.local_step = previous_follower.local_step
        self._follower = follower
        self._prepare_loop(follower, announce=False)

    @override
    def on_train_start(self) -> None:
        """After a checkpoint was restored (on every process): the followers take rank 0's state."""
        super().on_train_start()
        self._share_state()

    def _share_state(self) -> None:
        group, replicas = self._group, self._replicas
        if group is None or replicas is None:
            return
        collaborative = self.collaborative_optimizer
        outcome = None
        if self._follower is None and collaborative is not None:
            num_peers = collaborative.collaboration_state.num_peers
            outcome = LeaderOutcome(updated=False, changed=True, step=collaborative.local_step, num_peers=num_peers)
        outcome = group.share_outcome(outcome)
        replicas.synchronize(outcome)
        if self._follower is not None:
            self._follower.local_step, self._follower.num_peers = outcome.step, outcome.num_peers

    # ------------------------------------------------------------------ training hooks

    @override
    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        local = self._follower if self._follower is not None else self.collaborative_optimizer
        inner = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer in manual optimization
        replicas = self._replicas
        if local is None or inner is not local or replicas is None:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        samples = self._take_pending_samples()
        model = model or self.lightning_module
        # Every process runs the closure first: forward and backward, in which DDP averages the local gradients
        # (collectives run in the same order on every process), then Lightning's on_before_optimizer_step hooks.
        output = closure()
        self.precision_plugin._after_closure(model, local)  # type: ignore[arg-type]  # a protected Precision method
        collaborative = self.collaborative_optimizer
        contribute = None
        if self._follower is None and collaborative is not None:
            collaborative.record_loss(output)

            def contribute(peer_samples: int) -> LeaderOutcome:
                collaborative.step(batch_size=peer_samples)  # the samples of all local processes
                scaler = self._grad_scaler
                return leader_outcome(collaborative, float(scaler.get_scale()) if scaler is not None else 0.0)

        outcome = replicas.step(samples, contribute)  # parameters, learning rates, scheduler: rank 0's now
        if self._follower is not None:
            self._follower.follow(outcome)
        self._log_metrics()
        return output


__all__ = ["MultiDeviceCollaborativeMixin"]
