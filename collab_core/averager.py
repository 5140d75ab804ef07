"""The averager that runs one collaborative all-reduce per step: hivemind's DecentralizedAverager, made exact.

Every network operation (matchmaking, all-reduce, state download) is hivemind's. This subclass adds what the
collaborative step needs, each through the averager's own control pipe, like hivemind's ``set_group_bits``:

* :meth:`CollaborativeAverager.prepare_round` puts the collaborative step number and the state fingerprint into the
  matchmaking group key, so peers at different steps, or holding different states, can never average together, and
  sets the group size to the number of peers known to be
  at this step, so the group closes as soon as all of them are in instead of waiting out the matchmaking window.
* State served to joining peers comes from a callback (:meth:`get_current_state`), so downloads carry exactly the
  parameters, optimizer state, scheduler state and step counter (no gradient buffers).
* An all-reduce that lost part of its results fails loudly (see :meth:`_run_allreduce_inplace_`).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllreduceException, AllReduceRunner, AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.utils import MPFuture, get_dht_time
from hivemind.utils.asyncio import as_aiter, azip

from collab_core.fingerprint import fingerprint_key_bits
from collab_core.log import get_logger

logger = get_logger(__name__)

#: bits of the collaborative step put into the matchmaking key (steps 65536 apart share a key; harmless)
STEP_KEY_BITS = 16

StateProvider = Callable[[], tuple[dict[str, Any], Sequence[torch.Tensor]]]


class PartialAllreduceError(AllreduceException):
    """The all-reduce finished but some parts were never averaged (a groupmate died or timed out)."""


class CollaborativeAverager(DecentralizedAverager):
    """A DecentralizedAverager for collaborative steps (see the module docstring).

    Args:
        averaged_tensors: host-memory buffers averaged in place by each all-reduce.
        dht: a running DHT.
        prefix: matchmaking and state-sharing namespace (the run id).
        state_provider: returns ``(metadata, tensors)`` that a joining peer downloads; called from a background
            thread of this process, so it must take its own lock.
        **kwargs: forwarded to :class:`hivemind.averaging.DecentralizedAverager`.
    """

    def __init__(
        self,
        averaged_tensors: Sequence[torch.Tensor],
        dht: Any,
        *,
        prefix: str,
        state_provider: StateProvider,
        **kwargs: Any,
    ):
        self._state_provider = state_provider
        super().__init__(averaged_tensors, dht, prefix=prefix, start=True, **kwargs)

    def run_in_background(self, await_ready: bool = True, timeout: float | None = None) -> None:
        """Start the averager process, keeping this process' Ctrl-C handler.

        Workaround (hivemind 1.1.12, ``DecentralizedAverager.run_in_background``): hivemind sets SIGINT to
        ``SIG_IGN`` in the *calling* process so that the forked averager inherits it, and never restores it; Ctrl-C
        (and Lightning's graceful shutdown on SIGINT) then did nothing in the training process.
        """
        previous = signal.getsignal(signal.SIGINT)
        try:
            super().run_in_background(await_ready=await_ready, timeout=timeout)
        finally:
            if previous is not None and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, previous)

    def get_current_state(self) -> tuple[dict[str, Any], Sequence[torch.Tensor], None]:
        """State sent to a peer that calls ``load_state_from_peers`` (runs in this process' background thread)."""
        metadata, tensors = self._state_provider()
        return metadata, tensors, None

    def prepare_round(self, step: int, group_size: int | None, timeout: float, fingerprint: str = "") -> None:
        """Use the matchmaking key of collaborative step ``step`` and state ``fingerprint``; close groups at
        ``group_size`` peers."""
        group_bits = format(step % (1 << STEP_KEY_BITS), f"0{STEP_KEY_BITS}b") + fingerprint_key_bits(fingerprint)
        future = MPFuture()
        self._outer_pipe.send(("_prepare_round", [], dict(group_bits=group_bits, group_size=group_size, future=future)))
        future.result(timeout=timeout)

    async def _prepare_round(self, group_bits: str, group_size: int | None, future: MPFuture) -> None:
        # Runs in the averager process. hivemind fixes target_group_size at construction and offers no setter, so
        # the copies kept by Matchmaking (closes a full group) and PotentialLeaders are updated here. The copy in
        # GroupKeyManager is cleared instead: hivemind uses it after each round to pick the next group bits (which we
        # overwrite before every round anyway), and there it *crashes* ("Sample larger than population") when a peer
        # with a smaller target joins a larger group, which happens while peers' views of the collaboration differ.
        try:
            matchmaking = self._matchmaking
            matchmaking.group_key_manager.group_bits = group_bits
            matchmaking.group_key_manager.target_group_size = None
            matchmaking.target_group_size = group_size
            matchmaking.potential_leaders.target_group_size = group_size
            future.set_result(None)
        except Exception as e:
            if not future.done():
                future.set_exception(e)

    async def _run_allreduce_inplace_(
        self, tensors: Sequence[torch.Tensor], group_info: GroupInfo, group_id: bytes | None = None, **kwargs: Any
    ) -> None:
        # WORKAROUND (hivemind 1.1.12): when a groupmate that reduces part of the vector dies or times out, hivemind
        # keeps this peer's *local* values for that part ("proceeds with local gradients"), logs a warning and
        # reports success. Replicas then silently diverge. This copy of DecentralizedAverager._run_allreduce_inplace_
        # is unchanged except for the check at the end, which turns such a round into a failure.
        group_id = group_info.group_id if group_id is None else group_id
        runner = AllReduceRunner(
            p2p=self._p2p,
            servicer_type=type(self),
            prefix=self.prefix,
            tensors=tensors,
            group_id=group_id,
            ordered_peer_ids=group_info.peer_ids,
            **kwargs,
        )
        assert group_id in self._running_groups, (
            f"Group id {group_id!r} was not registered in _register_allreduce_group"
        )
        self._running_groups[group_id].set_result(runner)

        if runner.modes[group_info.peer_ids.index(self.peer_id)] != AveragingMode.AUX:
            async for tensor, update in azip(as_aiter(*tensors), runner):
                tensor.add_(update, alpha=self._averaging_alpha)
                self.last_updated = get_dht_time()
                self._state_updated.set()
        else:
            async for _ in runner:
                raise ValueError("aux peers should not receive averaged tensors")

        missing = runner.tensor_part_container.failed_size
        if missing:
            raise PartialAllreduceError(
                f"all-reduce lost {missing} of {runner.tensor_part_container.total_size} values (a groupmate failed)"
            )


__all__ = ["CollaborativeAverager", "PartialAllreduceError", "STEP_KEY_BITS"]
