"""The collaboration engine: one peer's lifecycle in a collaborative run, for every averaging scheme.

How one collaborative step works (``k`` is the number of collaborative steps taken so far):

1. :meth:`Collaboration.try_step` accumulates the micro-batch and publishes "peer P has ``n`` samples toward step
   ``k`` with state fingerprint F" in the DHT (the tracker's background thread publishes). Nothing on this path waits
   for the network.
2. When the collaboration *may* have reached ``target_batch_size`` (by the last view, extrapolated with the peers'
   reported speed), the engine reads the records again, synchronously, and acts only on this fresh view. If the
   target is imminent (expected within this peer's own time per micro-batch) it polls briefly instead of starting
   another micro-batch.
3. The :class:`~collab_core.planner.RoundPlanner` decides: run a round with the peers at step ``k`` that hold the same
   state, step alone, download, or wait. A round (:class:`~collab_core.rounds.AveragingRound`) averages the scheme's
   buffers in one hivemind all-reduce, weighted by sample counts. Matchmaking uses a group key made of ``k`` and the
   fingerprint, so peers at different steps or with different states never mix, and closes the group as soon as
   every expected peer is in.
4. Every member of a completed round applies the same result (:mod:`collab_core.schemes`), steps the scheduler once,
   and moves to fingerprint ``next_fingerprint(F, k, contributions)``: the same on every member.

Failures: a round that fails changes nothing locally; the peer keeps its accumulated gradients and tries again,
unless others took the step meanwhile (then it downloads their state). Forks (two live peers at one step with
different fingerprints, whatever caused them) are healed: the losing side downloads the winner's state before it
contributes again (see :mod:`collab_core.planner`).

Threads and processes of one peer: the training thread (``try_step``), the tracker thread (publishes this peer's
record, re-reads everybody's on a schedule), the averager *process* with its state-serving thread, the DHT process
and the p2pd daemon. One state lock is held from writing the round's buffers to applying the update, and by a
download; serving a state takes it too, so a joiner never receives a half-applied step.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from hivemind.dht import DHT
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

from collab_core.averager import CollaborativeAverager
from collab_core.backup import is_backup
from collab_core.fingerprint import next_fingerprint, tensors_fingerprint
from collab_core.local_update import LocalUpdate
from collab_core.log import get_logger
from collab_core.metrics_publisher import MetricsPublisher
from collab_core.peer_metrics import package_version
from collab_core.planner import Action, Decision, Fork, LocalPeer, RoundPlanner
from collab_core.progress import CollaborationTracker, CollaborationView
from collab_core.reporting import CollaborationProgress
from collab_core.rounds import AveragingRound, RoundOutcome, RoundStatus, sample_count
from collab_core.schemes import AveragingScheme
from collab_core.state import IncompleteStateError
from collab_core.sync import StateSynchronizer, refusal
from collab_core.timeouts import RoundTimeouts

logger = get_logger(__name__)

#: read the progress records when the estimate is within this fraction of the target
ESTIMATE_MARGIN = 0.1
#: how often to re-read progress while waiting for an imminent target (seconds)
TARGET_POLL_INTERVAL = 0.005
#: how often a step() that only accumulated may refresh the status line's numbers (seconds)
STATUS_INTERVAL = 0.5
#: how often to poll while waiting for peers (shutdown, wait_for_peers) (seconds)
PEER_POLL_INTERVAL = 0.25


@dataclass(frozen=True)
class CollaborationState:
    """What this peer knows about the collaboration (``CollaborativeOptimizer.collaboration_state``).

    Attributes:
        optimizer_step: collaborative steps this peer has taken (same as ``local_step``).
        global_step: the newest collaborative step announced by any peer.
        samples_accumulated: samples accumulated toward this peer's next step, collaboration-wide (last view).
        target_batch_size: samples the collaboration accumulates per step.
        num_peers: peers seen in the last view (this one included).
        num_clients: how many of them run in client mode.
        eta_next_step: estimated wall-clock time (DHT time) of the next collaborative step.
        next_fetch_time: when the background tracker reads the collaboration's progress again (DHT time).
        failed_rounds: averaging rounds that failed on this peer (it did not apply them).
        state_downloads: times this peer downloaded the state from peers.
        overflow_steps: collaborative steps skipped because some peer's fp16 gradients had inf/NaN.
        last_round_peers: peers that took part in this peer's last collaborative step.
        last_round_samples: samples averaged in that step.
        last_round_participants: DHT peer ids (base58) of those peers, this one included.
        samples_per_second: the whole collaboration's throughput, by the peers' reports (last view).
        nonfinite_steps: collaborative steps skipped because the averaged gradient had inf/NaN although no peer
            flagged an fp16 overflow (e.g. a faulty or malicious peer sent inf/NaN gradients).
        short_rounds: rounds (counted in ``failed_rounds`` too) not applied because the group gathered fewer than
            ``target_batch_size`` samples (expected peers did not come, or a record overstated a peer's samples).
        last_round_contributions: samples each of those peers contributed to that step, by DHT peer id (base58);
            summing them over steps gives a leaderboard of contributions.
        fingerprint: this peer's state fingerprint (equal on every replica of the same state).
        forks_healed: times this peer found itself on the losing side of a fork and loaded the winner's state.
    """

    optimizer_step: int
    global_step: int
    samples_accumulated: int
    target_batch_size: int
    num_peers: int
    num_clients: int
    eta_next_step: float
    next_fetch_time: float
    failed_rounds: int
    state_downloads: int
    overflow_steps: int
    last_round_peers: int
    last_round_samples: int
    last_round_participants: tuple[str, ...] = ()
    samples_per_second: float = 0.0
    nonfinite_steps: int = 0
    short_rounds: int = 0
    last_round_contributions: dict[str, int] = field(default_factory=dict)
    fingerprint: str = ""
    forks_healed: int = 0


class StepOutcome(Enum):
    """What one :meth:`Collaboration.try_step` did."""

    ACCUMULATED = "accumulated"  #: the micro-batch was accumulated; no step yet
    UPDATED = "updated"  #: a collaborative step was applied
    SKIPPED = "skipped"  #: a collaborative step was taken but its update skipped (inf/NaN gradients)
    DOWNLOADED = "downloaded"  #: the state was downloaded from peers (the micro-batch was discarded)
    ROUND_FAILED = "round failed"  #: a round was tried and not applied; the samples stay accumulated


@dataclass(frozen=True)
class StepReport:
    """What one ``step()`` call did.

    Attributes:
        outcome: see :class:`StepOutcome`.
        step_before: the collaborative step before the call.
        step_after: the collaborative step after it.
        round: the round's outcome, if a round ran.
        reason: why a download or a wait happened, for logs.
        local_update: the scheme took a local optimizer step with this call's micro-batch (DiLoCo's inner step).
    """

    outcome: StepOutcome
    step_before: int
    step_after: int
    round: RoundOutcome | None = None
    reason: str = ""
    local_update: bool = False

    @property
    def stepped(self) -> bool:
        """Whether the collaborative step changed (an update, a skipped update, or a download)."""
        return self.step_after != self.step_before or self.outcome is StepOutcome.DOWNLOADED

    @property
    def parameters_changed(self) -> bool:
        """Whether the call may have changed the parameters: a collaborative step, a download, or a local (inner)
        step of the scheme (DiLoCo takes one at every call)."""
        return self.stepped or self.local_update


class Collaboration:
    """One peer of a collaborative run: accumulation, rounds, downloads, fork healing, shutdown, checkpoints.

    The façades (:class:`~collab_core.optimizer.CollaborativeOptimizer` and friends) validate their arguments and
    build one of these; every averaging scheme runs on it unchanged.

    Call order: :meth:`try_step` once per micro-batch (after ``backward``) from one training thread;
    :meth:`load_state_dict` before training or between steps; :meth:`shutdown` once at the end (idempotent);
    :meth:`state_dict` at any time, also after :meth:`shutdown`.

    Args:
        scheme: what is averaged and how it is applied.
        local: this peer's accumulated gradients, optimizer and scheduler (the scheme's ``local``).
        dht: a running DHT.
        prefix: the run's name.
        target_batch_size: samples per collaborative step, collaboration-wide.
        timeouts: the step's timeouts.
        step_tolerance: see :class:`~collab_core.planner.RoundPlanner`.
        client_mode: accept no incoming connections.
        averager_kwargs: passed to hivemind's averager.
        tracker_kwargs: passed to :class:`~collab_core.progress.CollaborationTracker`.
        group_size_cap: hivemind's ``target_group_size``, or None.
        max_backoff: the longest pause between automatic download attempts (seconds).
        verbose: log progress at INFO instead of DEBUG.
    """

    def __init__(
        self,
        scheme: AveragingScheme,
        local: LocalUpdate,
        *,
        dht: DHT,
        prefix: str,
        target_batch_size: int,
        timeouts: RoundTimeouts,
        step_tolerance: int,
        client_mode: bool,
        averager_kwargs: dict[str, Any],
        tracker_kwargs: dict[str, Any],
        group_size_cap: int | None,
        max_backoff: float,
        verbose: bool = False,
    ):
        self.scheme, self.local, self.dht, self.prefix = scheme, local, dht, prefix
        self.target_batch_size = target_batch_size
        self.timeouts = timeouts
        self.client_mode = client_mode
        self.status_loglevel = logging.INFO if verbose else logging.DEBUG
        self.local_step = 0
        self.fingerprint = scheme.initial_fingerprint()
        #: what this peer is doing, for progress displays: "accumulating", "averaging", "downloading", "leaving",
        #: "stopped"
        self.activity = "accumulating"
        self.planner = RoundPlanner(
            target_batch_size,
            step_tolerance,
            retry_window=timeouts.matchmaking_window,
            no_group_window=timeouts.round,
            max_distrust=max_backoff,
        )
        self.failed_rounds = 0
        self.short_rounds = 0
        self.forks_healed = 0
        self.last_report: StepReport | None = None
        self._last_round: dict[bytes, Any] = {}  # peer id -> gathered info of this peer's last step
        self._last_round_reached: int | None = None  # the step this peer's last round led to
        self._state_lock = threading.RLock()
        self._shutdown_done = False
        self._last_step_call: float | None = None
        self._seconds_per_call = 0.0  # moving average of the time between step() calls (this peer's micro-batch)
        self._stepped_locally = False  # the scheme took a local (inner) step in the current try_step

        self.averager = CollaborativeAverager(
            scheme.make_buffers(),
            dht,
            prefix=f"{prefix}_averager",
            state_provider=self._shared_state,
            client_mode=client_mode,
            **averager_kwargs,
        )
        self.round = AveragingRound(self.averager, timeouts, target_batch_size, group_size_cap)
        self.sync = StateSynchronizer(
            self.averager, max_backoff=max_backoff, min_backoff=timeouts.matchmaking, prefix=prefix
        )
        try:
            self.tracker = CollaborationTracker(
                dht,
                prefix,
                target_batch_size,
                fingerprint=self.fingerprint,
                client_mode=client_mode,
                status_loglevel=self.status_loglevel,  # its refresh line is throttled (collab_core.reporting)
                start=True,
                **tracker_kwargs,
            )
        except BaseException:
            self.averager.shutdown()
            raise
        #: this peer's metrics record for monitors (``collab monitor``): loss, samples contributed, how it is reached
        self.metrics = MetricsPublisher(
            dht,
            prefix,
            self.tracker._local_public_key,
            target_batch_size=target_batch_size,
            client_mode=client_mode,
            expiration=float(self.tracker.metadata_expiration),
            version=package_version(),
        )
        #: human-facing status lines (peers joined or left, downloads, failed rounds, periodic progress)
        self.status = CollaborationProgress(prefix, periodic=True, level=self.status_loglevel)
        self._status_at = -math.inf
        self._announce()

    # ------------------------------------------------------------------ what the façades read

    @property
    def is_shut_down(self) -> bool:
        return self._shutdown_done

    def local_peer(self, view: CollaborationView | None = None) -> LocalPeer:
        """This peer's position, for the planner."""
        peer_id = view.local_peer_id if view is not None else self.tracker.view.local_peer_id
        return LocalPeer(peer_id, self.local_step, self.local.samples, self.fingerprint, self.client_mode)

    def steps_behind(self) -> int:
        """How many steps the most advanced credible peer is ahead of this one (last view)."""
        view = self.tracker.view
        return self.planner.steps_behind(view.peers, self.local_peer(view), get_dht_time())

    def collaboration_state(self) -> CollaborationState:
        """See :class:`CollaborationState`."""
        view = self.tracker.view
        contributions = {PeerID(peer_id).to_base58(): sample_count(info) for peer_id, info in self._last_round.items()}
        return CollaborationState(
            optimizer_step=self.local_step,
            global_step=view.epoch,
            samples_accumulated=self.planner.samples_toward_step(view.peers, self.local_peer(view)),
            target_batch_size=self.target_batch_size,
            num_peers=view.num_peers,
            num_clients=view.num_clients,
            eta_next_step=view.eta_next_epoch,
            next_fetch_time=view.next_fetch_time,
            failed_rounds=self.failed_rounds,
            state_downloads=self.sync.downloads,
            overflow_steps=self.local.overflow_steps,
            last_round_peers=len(self._last_round),
            last_round_samples=sum(contributions.values()),
            last_round_participants=tuple(contributions),
            last_round_contributions=contributions,
            samples_per_second=float(view.samples_per_second),
            nonfinite_steps=self.local.nonfinite_steps,
            short_rounds=self.short_rounds,
            fingerprint=self.fingerprint,
            forks_healed=self.forks_healed,
        )

    def record_loss(self, loss: Any) -> None:
        """The latest training loss, published in this peer's metrics record (see
        :meth:`collab_core.metrics_publisher.MetricsPublisher.record_loss`)."""
        self.metrics.record_loss(loss)

    # ------------------------------------------------------------------ one step() call

    def try_step(self, batch_size: int) -> StepReport:
        """Accumulate ``batch_size`` samples (gradients in ``param.grad``); step when the collaboration is there.

        Returns:
            What the call did.
        """
        if self._shutdown_done:
            raise ValueError("this collaborative optimizer was shut down; create a new one to keep training")
        step_before = self.local_step
        self._measure_call_interval()
        now, background = get_dht_time(), self.tracker.view
        decision = self.planner.before_accumulating(
            background.peers, self.local_peer(background), now, self.sync.may_download()
        )
        if decision.action is Action.DOWNLOAD:
            self._log_download(decision)
            self.local.discard_current_gradients()
            loaded = self._download(decision, require_newer=True)
            return self._report(StepOutcome.DOWNLOADED if loaded else StepOutcome.ACCUMULATED, step_before, decision)

        self.scheme.add_micro_batch(batch_size)
        self._stepped_locally = self.scheme.steps_locally  # DiLoCo's inner step changed the parameters
        self.metrics.count(batch_size)
        local = self.local_peer(background)
        # by the last view, may the target be reached before this peer finishes its next micro-batch? (with a margin
        # for the others' speed estimates, which are only moving averages)
        near_target = (
            self.planner.estimated_samples(background.peers, local, now + self._seconds_per_call)
            >= (1 - ESTIMATE_MARGIN) * self.target_batch_size
        )
        # others read this peer's record to decide when to step: publish every micro-batch near the target, and at
        # most every min_refresh_period otherwise (each publication is a DHT store)
        publish = near_target or now - self.tracker.last_published >= self.tracker.min_refresh_period
        self.tracker.report_local_progress(self.local_step, self.local.samples, publish=publish)
        if background.num_peers <= 1 and now - background.fetched_at >= self.tracker.min_refresh_period:
            self.tracker.request_refresh()  # alone so far: look for newcomers often, in the background
        if not near_target:
            return self._report(StepOutcome.ACCUMULATED, step_before)
        view = self._view_to_act_on()
        if view is None:
            return self._report(StepOutcome.ACCUMULATED, step_before)
        return self._act(view, step_before)

    def _report(
        self, outcome: StepOutcome, step_before: int, decision: Decision | None = None, **kw: Any
    ) -> StepReport:
        local_update, self._stepped_locally = self._stepped_locally, False
        report = StepReport(
            outcome,
            step_before,
            self.local_step,
            reason=decision.reason if decision else "",
            local_update=local_update,
            **kw,
        )
        self.last_report = report
        self.metrics.at_step(self.local_step)
        now = time.monotonic()
        if outcome is not StepOutcome.ACCUMULATED or now - self._status_at >= STATUS_INTERVAL:
            self._status_at = now
            self.status.update(self.collaboration_state(), now)
        return report

    def _view_to_act_on(self) -> CollaborationView | None:
        """A fresh view on which the planner says to act (target reached, peers ahead, a lost fork), or None."""
        deadline = time.perf_counter() + min(self._seconds_per_call, self.timeouts.matchmaking)
        while True:
            try:
                view = self.tracker.fetch_now(timeout=self.timeouts.request)
            except Exception as e:  # the DHT did not answer: keep training, try again at the next step()
                logger.warning(f"{self.prefix}: could not read the collaboration's progress: {e!r}")
                return None
            local = self.local_peer(view)
            if self.planner.should_act(view.peers, local, get_dht_time()):
                return view
            # not there yet: wait (polling) only if the others will get there before this peer could finish another
            # micro-batch; computing one would overshoot the target and delay the step by a whole micro-batch
            remaining = deadline - time.perf_counter()
            imminent = (
                self.planner.estimated_samples(view.peers, local, get_dht_time() + remaining) >= self.target_batch_size
            )
            if not imminent or remaining <= 0:
                return None
            time.sleep(TARGET_POLL_INTERVAL)

    def _act(self, view: CollaborationView, step_before: int) -> StepReport:
        local = self.local_peer(view)
        decision = self.planner.plan_step(view.peers, local, get_dht_time(), self.sync.may_download())
        if decision.action is Action.DOWNLOAD:
            # Not under the state lock: peers that download from this one meanwhile get its current state at once.
            # (Held here, two peers downloading from each other at the same time, e.g. both misled by a forged
            # record, each blocked the other's request until hivemind's per-chunk timeout.)
            self._log_download(decision)
            with self.tracker.performance_ema.pause():
                loaded = self._download(decision, require_newer=True)
            return self._report(StepOutcome.DOWNLOADED if loaded else StepOutcome.ACCUMULATED, step_before, decision)
        if decision.action is Action.WAIT:
            logger.debug(f"{self.prefix}: {decision.reason}")
            return self._report(StepOutcome.ACCUMULATED, step_before, decision)
        # The state lock is held for the whole step, so a peer downloading this peer's state meanwhile gets the
        # state *after* this step instead of one that is outdated a moment later. The speed this peer reports
        # counts compute only: time in the round would make others underestimate how soon it contributes again.
        with self._state_lock, self.tracker.performance_ema.pause(), self._doing("averaging"):
            if decision.action is Action.STEP_ALONE:
                self.scheme.step_alone(self.local_step)
                self._finish_step({local.peer_id: dict(step=self.local_step, samples=local.samples)})
                outcome = StepOutcome.SKIPPED if self.local.last_step_skipped else StepOutcome.UPDATED
                return self._report(outcome, step_before, decision)
            return self._run_round(view, local, decision, step_before)

    def _run_round(self, view: CollaborationView, local: LocalPeer, decision: Decision, step_before: int) -> StepReport:
        step = self.local_step
        with torch.no_grad(), self.averager.get_tensors() as buffers:
            self.scheme.write(buffers, step)
        try:
            outcome = self.round.run(step, local.samples, self.fingerprint, decision.group, self._others_took_step)
        except BaseException:
            self.scheme.discard()
            raise
        status = outcome.status
        if outcome.applies:
            with torch.no_grad(), self.averager.get_tensors() as buffers:
                self.scheme.apply(buffers, step)
            self.planner.record_round(decision.group, outcome.gathered)
            logger.debug(
                f"{self.prefix}: averaged step {step} with {len(outcome.gathered)} of {len(decision.group)} "
                f"expected peer(s) in {outcome.seconds:.3f}s",
            )
            self._finish_step(dict(outcome.gathered))
            result = StepOutcome.SKIPPED if self.local.last_step_skipped else StepOutcome.UPDATED
            return self._report(result, step_before, decision, round=outcome)

        self.scheme.discard()
        if status is RoundStatus.MISSED:
            logger.debug(f"{self.prefix}: other peers took step {step} without this peer")
            loaded = self._download(decision, require_newer=True)
            return self._report(
                StepOutcome.DOWNLOADED if loaded else StepOutcome.ROUND_FAILED, step_before, decision, round=outcome
            )
        self.failed_rounds += 1
        if status is RoundStatus.NO_GROUP:
            self.planner.record_no_group(decision.group, local, get_dht_time())
        elif status is RoundStatus.BROKE:
            # groupmates that got all their parts applied this round (hivemind's all-reduce is not atomic):
            # retrying the step without them would fork the replicas
            self.planner.record_broken_round(step, decision.group, get_dht_time())
            self._announce()  # tells the groupmates at once that this peer did not take the step
        else:
            self.planner.record_round(decision.group, outcome.gathered)
        if status in (RoundStatus.NO_GROUP, RoundStatus.BROKE):
            logger.warning(
                f"{self.prefix}: averaging for step {step} failed ({outcome.error!r}); will retry or resynchronize"
            )
        elif status is RoundStatus.SHORT:
            # the view that triggered this round counted samples that did not come; every member sees the same
            # gathered counts, so all of them skip it together and keep accumulating
            self.short_rounds += 1
            gathered = sum(outcome.contributions.values())
            logger.warning(
                f"{self.prefix}: the group for step {step} gathered {gathered} of {self.target_batch_size} samples "
                f"({len(outcome.gathered)} of {len(decision.group)} expected peers came); not applying it, "
                "accumulating more"
            )
        else:
            logger.warning(f"{self.prefix}: the group for step {step} was not applied: {status.value}")
        return self._report(StepOutcome.ROUND_FAILED, step_before, decision, round=outcome)

    def _log_download(self, decision: Decision) -> None:
        if decision.fork is None:
            logger.debug(f"{self.prefix}: {decision.reason}; downloading the state")
        else:
            logger.warning(
                f"{self.prefix}: {decision.reason}; this replica ({self.fingerprint}) downloads the kept state before "
                "it contributes again"
            )

    def _others_took_step(self) -> bool:
        view = self.tracker.fetch_now(timeout=self.timeouts.request)
        return bool(self.planner.peers_ahead(view.peers, self.local_peer(view), get_dht_time()))

    def _finish_step(self, gathered: dict[bytes, Any]) -> None:
        contributions = {peer_id: sample_count(info) for peer_id, info in gathered.items()}
        self._last_round = gathered
        self.planner.record_step(gathered, get_dht_time())
        self._move_to(self.local_step + 1, next_fingerprint(self.fingerprint, self.local_step, contributions))
        self._last_round_reached = self.local_step

    # ------------------------------------------------------------------ downloads

    def load_state_from_peers(self, timeout: float | None = None) -> bool:
        """Download a state from any peer (not an older one); True if one was loaded."""
        return self._download(None, require_newer=False, timeout=timeout)

    def _download(self, decision: Decision | None, require_newer: bool, timeout: float | None = None) -> bool:
        """Download and load a peer's state; on refusal, back off and distrust the records that claimed it."""
        fork = decision.fork if decision is not None else None
        with self._doing("downloading"):
            served = self.sync.fetch(self.timeouts.download if timeout is None else timeout)
        if served is None:
            return self._refused("no peer could provide its state", fork)
        wanted = fork.winner if fork is not None else None
        reason = refusal(served, self.local_step, self.fingerprint, require_newer, wanted)
        if reason is not None:
            return self._refused(reason, fork)
        with self._state_lock:  # parameters and step change together for peers downloading from this one
            try:
                step = self.scheme.restore(served.metadata, served.tensors)
            except IncompleteStateError as e:  # checked before anything is loaded: the local state is untouched
                return self._refused(f"{e} (the serving peer stopped mid-transfer); nothing was loaded", fork)
            except (ValueError, KeyError, TypeError) as e:
                raise RuntimeError(f"{self.prefix}: the state downloaded from a peer cannot be loaded: {e}") from e
            if fork is not None:  # the winner's state, or a later one of its line
                self.forks_healed += 1
                logger.warning(f"{self.prefix}: healed a fork of the replicas at {fork.describe()}, now at step {step}")
            fingerprint = served.fingerprint or tensors_fingerprint(self.local.params, step=step)
            self._move_to(step, fingerprint)
        self.sync.succeeded()
        self._last_round_reached = None
        self.planner.record_download(self.tracker.view.peers, step, get_dht_time())
        self._announce()
        logger.debug(f"{self.prefix}: downloaded the collaboration's state at step {step}")
        return True

    def _refused(self, reason: str, fork: Fork | None) -> bool:
        view = self.tracker.view
        self.sync.failed(reason)
        now = get_dht_time()
        self.planner.record_refused_download(
            view.peers, self.local_peer(view), now, self.sync.retry_at_dht_time(now), fork
        )
        return False

    def _shared_state(self) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """The state a joining peer downloads (called from the averager's background thread)."""
        with self._state_lock:
            metadata, tensors = self.scheme.capture(self.local_step)
            metadata["fingerprint"] = self.fingerprint
            return metadata, tensors

    # ------------------------------------------------------------------ step changes, checkpoints

    def _move_to(self, step: int, fingerprint: str) -> None:
        """Move to collaborative step ``step`` with state ``fingerprint`` and empty accumulators; tell the others."""
        with self._state_lock:
            self.local.reset()
            self.local_step, self.fingerprint = step, fingerprint
            self.tracker.fingerprint = fingerprint
        with self.tracker.pause_updates():
            self.tracker.update_epoch(step)
        if not self.client_mode:
            self.averager.state_sharing_priority = step  # peers download from the most advanced peer first
        self.metrics.at_step(step)

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint: optimizer and scheduler state dicts, the collaborative step and the fingerprint."""
        with self._state_lock:
            state = {
                "optimizer": self.local.opt.state_dict(),
                "scheduler": self.local.scheduler.state_dict() if self.local.scheduler is not None else None,
                "local_step": self.local_step,
                "fingerprint": self.fingerprint,
            }
            scheme_state = self.scheme.state_dict()
            if scheme_state:
                state["scheme"] = scheme_state
            return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a checkpoint made by :meth:`state_dict` (a plain optimizer state dict is accepted as well; it
        leaves the step and fingerprint as they are), or a swarm backup (:mod:`collab_core.backup`), which also
        restores the parameters.

        A checkpoint without a fingerprint (older versions, or a plain state dict) gets one from its parameters, so
        peers restarted from the same checkpoint agree and peers restarted from different ones are a fork.
        """
        opt, scheduler = self.local.opt, self.local.scheduler
        if is_backup(state_dict):  # a swarm backup (collab monitor --backup-dir): a state download from disk
            with self._state_lock:
                step = self.scheme.restore(state_dict["metadata"], state_dict["tensors"])
                fingerprint = state_dict.get("fingerprint") or tensors_fingerprint(self.local.params, step=step)
                self._move_to(step, fingerprint)
                self._last_round_reached = None
            if not self._shutdown_done:
                self._announce()
            return
        with self._state_lock:
            if "local_step" not in state_dict:  # a plain optimizer state dict: the collaborative step stays
                opt.load_state_dict(state_dict)
                return
            opt.load_state_dict(state_dict["optimizer"])
            if scheduler is not None and state_dict.get("scheduler") is not None:
                scheduler.load_state_dict(state_dict["scheduler"])
            self.scheme.load_state_dict(state_dict.get("scheme"))
            step = int(state_dict["local_step"])
            fingerprint = state_dict.get("fingerprint") or tensors_fingerprint(self.local.params, step=step)
            self._move_to(step, fingerprint)
            self._last_round_reached = None
        if not self._shutdown_done:
            self._announce()  # others must see this peer at its restored step, not at the one it was created at

    # ------------------------------------------------------------------ waiting, leaving

    def wait_for_peers(self, num_peers: int, timeout: float) -> int:
        """Block until at least ``num_peers`` peers (this one included) are seen; see the façade's docstring."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            try:
                seen = self.tracker.fetch_now(timeout=self.timeouts.request).num_peers
            except Exception as e:  # the DHT did not answer this time: try again until the deadline
                logger.debug(f"{self.prefix}: could not read the collaboration's progress: {e!r}")
            if seen >= num_peers:
                return seen
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{self.prefix}: waited {timeout:.0f}s for {num_peers} peers, saw {seen}; start the other peers "
                    "with this peer's join hint (COLLAB_INITIAL_PEERS), or wait for fewer peers"
                )
            time.sleep(PEER_POLL_INTERVAL)

    def shutdown(self) -> None:
        """Leave: wait (bounded) for the peers of the last step, withdraw the record, stop the averager."""
        if self._shutdown_done:
            return
        self._shutdown_done = True
        try:
            self._settle_before_leaving()
        finally:
            self.activity = "stopped"
        try:
            self.metrics.withdraw(timeout=self.timeouts.request)
            self.tracker.shutdown(timeout=self.timeouts.request)
        finally:
            if self.averager.is_alive():
                self.averager.shutdown()

    def _settle_before_leaving(self) -> None:
        """Before leaving, settle this peer's last step with the peers that may not have it (bounded).

        hivemind's all-reduce returns on a peer as soon as *it* has every averaged part; the parts it reduced for
        its groupmates may still be on their way. A peer that shut its averager down right after its last step could
        cut that delivery: a groupmate's round then failed, and it took the step again without this peer, from other
        gradients. And a round that failed asymmetrically (one side "could not find a group", the other broke
        mid-way) makes both sides take the step alone: at the last step of training nobody trains on to see that
        fork. So the leaving peer stays (still serving its state) while :meth:`RoundPlanner.before_leaving` says so:
        a groupmate behind finds it ahead and downloads; the losing side of a fork at this step downloads from it,
        or, if this peer lost, it downloads the kept state itself. The wait lasts at most one more round after the
        step, plus a download once a fork is seen.
        """
        if not self.averager.is_alive():
            return
        stepped_at = self.planner.reached_step_at if self.planner.reached_step_at is not None else get_dht_time()
        deadline = stepped_at + self.timeouts.round
        local_id = self.tracker.view.local_peer_id
        mates = {peer_id for peer_id in self._last_round if peer_id != local_id}
        if self._last_round_reached != self.local_step:
            mates = set()  # this peer's state changed since that round (download, checkpoint)
        decision, extended = Decision(Action.LEAVE), False
        self.activity = "leaving"
        while get_dht_time() < deadline:
            try:
                view = self.tracker.fetch_now(timeout=self.timeouts.request)
            except Exception as e:  # the DHT did not answer: try again until the deadline
                logger.debug(f"{self.prefix}: could not read the collaboration's progress: {e!r}")
                continue
            now = get_dht_time()
            decision = self.planner.before_leaving(
                view.peers, self.local_peer(view), now, mates, self.sync.may_download(), self.timeouts.round
            )
            if decision.action is Action.LEAVE:
                return
            if decision.fork is not None and not extended:  # a fork at the last step: time for one download
                deadline, extended = max(deadline, now + self.timeouts.download), True
            if decision.action is Action.DOWNLOAD:
                self._log_download(decision)
                if self._download(decision, require_newer=True):
                    mates = set()
                continue
            time.sleep(PEER_POLL_INTERVAL)
        if decision.action is not Action.LEAVE:
            logger.warning(f"{self.prefix}: leaving at step {self.local_step} unsettled: {decision.reason}")

    # ------------------------------------------------------------------ small helpers

    @contextmanager
    def _doing(self, activity: str) -> Iterator[None]:
        previous, self.activity = self.activity, activity
        try:
            yield
        finally:
            self.activity = previous

    def _measure_call_interval(self) -> None:
        now = time.perf_counter()
        if self._last_step_call is not None:
            interval = now - self._last_step_call
            alpha = 0.3 if self._seconds_per_call else 1.0
            self._seconds_per_call = alpha * interval + (1 - alpha) * self._seconds_per_call
        self._last_step_call = now

    def _announce(self) -> None:
        """Tell the others at once that this peer is at its current step (so that they count it in)."""
        try:
            self.tracker.announce(timeout=self.timeouts.request)
        except Exception as e:  # not fatal: the background reporter publishes with the next samples
            logger.debug(f"{self.prefix}: could not announce this peer: {e!r}")


__all__ = ["Collaboration", "CollaborationState", "StepOutcome", "StepReport"]
