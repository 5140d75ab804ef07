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
* A state download counts the bytes it received in shared memory, so the trainer's process can show its progress
  and give up only when it stops moving (see :meth:`_load_state_from_peers`, :meth:`download_progress`).
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import random
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllreduceException, AllReduceRunner, AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.compression import deserialize_torch_tensor
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import MPFuture, get_dht_time
from hivemind.utils.asyncio import aiter_with_timeout, as_aiter, azip
from hivemind.utils.streaming import combine_from_streaming
from hivemind.utils.timed_storage import ValueWithExpiration

from collab_core.download_watch import DownloadProgress
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
        # written by the averager process while it downloads a state, read by this one (download_progress); made
        # before super().__init__ starts that process, so both share it: [serving peers tried, bytes received from
        # the current one, bytes it announced (-1: unknown)]
        self._download_counters = mp.Array(ctypes.c_int64, [0, 0, -1], lock=False)
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
        """State sent to a peer that calls ``load_state_from_peers`` (runs in this process' background thread).

        The metadata also announce the tensors' size (``state_bytes``), for the downloading peer's progress."""
        metadata, tensors = self._state_provider()
        metadata = {**metadata, "state_bytes": sum(tensor.numel() * tensor.element_size() for tensor in tensors)}
        return metadata, tensors, None

    def download_progress(self) -> DownloadProgress:
        """The counters of state downloads, as the averager process last wrote them (any process may call it)."""
        attempt, received, expected = self._download_counters[:]
        return DownloadProgress(attempt, received, expected if expected >= 0 else None)

    async def _load_state_from_peers(self, future: MPFuture, timeout: float | None = None) -> None:
        # Runs in the averager process (``load_state_from_peers`` sends it here). Replaces hivemind 1.1.12's
        # DecentralizedAverager._load_state_from_peers, which reports nothing until the state is complete, for the
        # same exchange on hivemind's own RPC (rpc_download_state): serving peers in the order of their announced
        # priority (highest first, ties at random), each stream read with the per-chunk timeout, the next peer after
        # a failure. What it adds: the bytes received go to the shared counters, so the trainer's process shows the
        # progress and waits as long as bytes keep coming (collab_core.download_watch).
        counters = self._download_counters
        chunk_timeout = self.next_chunk_timeout if self.next_chunk_timeout is not None else self.request_timeout
        try:
            for peer in await self._state_donors():
                if future.done():  # the trainer gave up on this download (no progress for too long)
                    return
                # the byte counts first, then the attempt: a reader that sees the new attempt sees its counts
                counters[1], counters[2] = 0, -1
                counters[0] += 1
                started = time.monotonic()
                logger.info(f"Downloading the state from peer {peer}")
                try:
                    served = await self._download_state_from(peer, chunk_timeout, future)
                except Exception as e:
                    logger.warning(f"The state download from peer {peer} failed ({e!r}); trying another peer")
                    continue
                if served is not None:
                    logger.info(f"Downloaded the state from peer {peer} in {time.monotonic() - started:.1f}s")
                    if not future.done():
                        future.set_result(served)
                    return
                logger.debug(f"{peer} does not share its state")
        except Exception as e:
            logger.warning(f"Could not download the state from peers: {e!r}")
        finally:
            if not future.done():
                future.set_result(None)

    async def _state_donors(self) -> list[PeerID]:
        """The peers that announced a state-sharing priority, highest first (ties in random order), not this one."""
        key = f"{self._matchmaking.group_key_manager.prefix}.all_averagers"
        found = await self.dht.get(key, latest=True, return_future=True)
        announced = found.value if isinstance(found, ValueWithExpiration) and isinstance(found.value, dict) else {}
        priorities: dict[PeerID, tuple[float, float]] = {}
        for peer_id, entry in announced.items():
            if isinstance(entry, ValueWithExpiration) and isinstance(entry.value, (float, int)):
                try:
                    priorities[PeerID(peer_id)] = (float(entry.value), random.random())
                except Exception:  # noqa: S112 - a malformed peer id in a record: not a peer to ask
                    continue
        ordered = sorted(priorities, key=lambda peer: priorities[peer], reverse=True)
        return [peer for peer in ordered if peer != self.peer_id]

    async def _download_state_from(
        self, peer: PeerID, chunk_timeout: float, future: MPFuture
    ) -> tuple[Any, list[torch.Tensor]] | None:
        """``(metadata, tensors)`` streamed by ``peer``, or None if it sent no state or the trainer gave up on the
        download (``future`` done); counts the bytes received."""
        counters = self._download_counters
        stub = self.get_stub(self._p2p, peer, namespace=self.prefix)
        stream = await stub.rpc_download_state(averaging_pb2.DownloadRequest())
        metadata: Any = None
        tensors: list[torch.Tensor] = []
        parts: list[Any] = []  # the streamed parts of the tensor being received
        async for message in aiter_with_timeout(stream, timeout=chunk_timeout):
            if future.done():  # abandoned: stop receiving (and stop the peer sending)
                return None
            if message.metadata:
                metadata = self.serializer.loads(message.metadata)
                announced = metadata.get("state_bytes") if isinstance(metadata, dict) else None
                if isinstance(announced, int) and not isinstance(announced, bool) and announced >= 0:
                    counters[2] = announced
            if message.tensor_part.dtype and parts:  # a part with a dtype starts the next tensor
                tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
                parts = []
            parts.append(message.tensor_part)
            counters[1] += len(message.tensor_part.buffer)
        if parts:
            tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
        return (metadata, tensors) if metadata else None

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
