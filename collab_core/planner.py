"""The round planner: what a peer does next, decided from a view of the collaboration. Pure: no torch, no network.

Every decision that used to be spread over the optimizer (who is expected in a round, when the target is reached,
when to download, whom to believe, when a failed round may be retried, and which side of a fork must re-synchronise)
is a method of :class:`RoundPlanner`, a function of:

* the peers' published records (:class:`~collab_core.records.PeerRecord`, this peer's own included),
* this peer's own position (:class:`LocalPeer`),
* the current DHT time, and
* what the planner remembers from earlier rounds (``record_*`` methods, called by the engine after each outcome).

So it can be tested table-driven on fabricated views, and the multi-peer tests confirm rather than discover.

Call order (the engine's contract):

1. every ``step()``: :meth:`RoundPlanner.before_accumulating` on the background view; ``DOWNLOAD`` means
   download before accumulating this micro-batch.
2. when the collaboration may have reached the target: read a fresh view, then :meth:`RoundPlanner.should_act`;
   if True, :meth:`RoundPlanner.plan_step` says what to do.
3. after acting: exactly one of :meth:`record_step` (a step was applied), :meth:`record_round` (a round completed,
   applied or not), :meth:`record_no_group`, :meth:`record_broken_round`, :meth:`record_download`,
   :meth:`record_refused_download`.
4. when leaving (``shutdown``): on fresh views, :meth:`RoundPlanner.before_leaving` until it says ``LEAVE`` (or a
   bounded wait ends); ``DOWNLOAD`` means this peer is on the losing side of a fork at its last step.

Forks: two live peers at the same step with different fingerprints hold different states. Every peer that sees it
computes the same winner (:func:`find_fork`): the side that can serve its state (has a peer that is not a client),
then the side with more peers, then the larger fingerprint. A peer on a losing side downloads before it contributes
again; it never averages with the other side meanwhile (the fingerprint is part of the matchmaking key). A side that
no peer can serve (a forged record, or a peer that crashed) is distrusted after a failed download, with the same
bounded back-off as forged "ahead" records.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from collab_core.records import PeerRecord


class Action(Enum):
    """What the engine should do next."""

    ACCUMULATE = "accumulate"  #: keep training: add this micro-batch and go on
    STEP_ALONE = "step alone"  #: nobody else is at this step with this state: apply this peer's own gradients
    RUN_ROUND = "run round"  #: average with the peers in ``Decision.group``
    DOWNLOAD = "download"  #: load a newer (or the fork winner's) state from peers first
    WAIT = "wait"  #: keep accumulating without stepping (``Decision.reason`` says why); when leaving: stay a while
    LEAVE = "leave"  #: when leaving: nothing is left to settle


@dataclass(frozen=True)
class Decision:
    """A :class:`RoundPlanner` decision.

    Attributes:
        action: what to do.
        group: for ``RUN_ROUND``: the peers expected in the round (this one included).
        reason: a human-readable why, for logs.
        fork: the fork this decision resolves, if any.
    """

    action: Action
    group: tuple[PeerRecord, ...] = ()
    reason: str = ""
    fork: Fork | None = None


@dataclass(frozen=True)
class LocalPeer:
    """This peer's own position.

    Attributes:
        peer_id: its DHT id.
        step: its collaborative step.
        samples: samples it accumulated toward that step.
        fingerprint: its state fingerprint.
        client_mode: whether it accepts no incoming connections.
    """

    peer_id: bytes
    step: int
    samples: int
    fingerprint: str
    client_mode: bool = False


@dataclass(frozen=True)
class Fork:
    """Peers at one step holding different states.

    Attributes:
        step: the step.
        sides: peer ids by fingerprint (every side of the fork).
        winner: the fingerprint every peer agrees to keep.
    """

    step: int
    sides: dict[str, tuple[bytes, ...]]
    winner: str

    def loses(self, fingerprint: str) -> bool:
        """Whether a replica with ``fingerprint`` must download the winner's state."""
        return fingerprint != self.winner

    def describe(self) -> str:
        """Both (all) sides, for a log line."""
        sides = ", ".join(
            f"{fp}{' (kept)' if fp == self.winner else ''}: {len(ids)} peer(s)" for fp, ids in self.sides.items()
        )
        return f"step {self.step}: {sides}"


def find_fork(records: Iterable[PeerRecord], step: int) -> Fork | None:
    """The fork among ``records`` at ``step``, if they hold more than one fingerprint; None otherwise.

    Records without a fingerprint are ignored. The winner is the side that can serve its state (has a peer that is
    not a client), then the side with more peers, then the larger fingerprint: every peer computes the same one.
    """
    by_fingerprint: dict[str, list[PeerRecord]] = {}
    for record in records:
        if record.step == step and record.fingerprint:
            by_fingerprint.setdefault(record.fingerprint, []).append(record)
    if len(by_fingerprint) < 2:
        return None

    def rank(item: tuple[str, list[PeerRecord]]) -> tuple[bool, int, str]:
        fingerprint, side = item
        return any(not peer.client_mode for peer in side), len(side), fingerprint

    winner = max(by_fingerprint.items(), key=rank)[0]
    sides = {fp: tuple(sorted(peer.peer_id for peer in side)) for fp, side in sorted(by_fingerprint.items())}
    return Fork(step=step, sides=sides, winner=winner)


@dataclass
class RoundPlanner:
    """Decides accumulate / step alone / run a round / download / wait (see the module docstring).

    Args:
        target_batch_size: samples the collaboration accumulates per step.
        step_tolerance: how many steps behind a peer may be and still keep training without downloading.
        retry_window: after a round that broke here mid-way, how long to wait for its silent groupmates to show
            whether they took the step (one matchmaking window: :attr:`RoundTimeouts.matchmaking_window`).
        no_group_window: after a round in which no group formed here, how long peers that were accumulating toward
            the same step may be in a round that counted this peer without its knowing (one whole round:
            :attr:`RoundTimeouts.round`); meanwhile this peer does not step alone. 0 disables the wait.
        max_distrust: the longest time an unchanged record found unbacked is distrusted (each new refusal of the
            same record doubles its distrust, up to this; the download back-off's cap).
    """

    target_batch_size: int
    step_tolerance: int
    retry_window: float
    no_group_window: float = 0.0
    max_distrust: float = float("inf")
    #: peers expected in a round that never came -> the time of the record they were expected on
    absent: dict[bytes, float] = field(default_factory=dict)
    #: peers of this peer's last step (or the likely producers of a downloaded state) -> when it was reached
    round_mates: dict[bytes, float] = field(default_factory=dict)
    #: when this peer reached its current step (None: it has not stepped or downloaded since it started)
    reached_step_at: float | None = None
    #: records found not to be backed by a state any peer serves -> (their time, believed again from, for how long)
    unbacked: dict[bytes, tuple[float, float, float]] = field(default_factory=dict)
    #: a round that broke here after its all-reduce began: (step, its peers, failure time)
    unsettled: tuple[int, frozenset[bytes], float] | None = None
    #: after a round in which no group formed here: (step, the peers that were accumulating toward it -> the time of
    #: their record then, until when they may be in a round that counted this peer)
    no_group: tuple[int, dict[bytes, float], float] | None = None

    # ------------------------------------------------------------------ whom to count

    def is_live(self, peer: PeerRecord) -> bool:
        """False for a peer that missed a round it was expected in and has published nothing since."""
        absent_since = self.absent.get(peer.peer_id)
        return absent_since is None or peer.time > absent_since

    def is_credible(self, peer: PeerRecord, now: float) -> bool:
        """False for a record found unbacked (no peer served its state), until it changes or the back-off ends."""
        claim = self.unbacked.get(peer.peer_id)
        return claim is None or peer.time > claim[0] or now >= claim[1]

    @staticmethod
    def same_state(peer: PeerRecord, local: LocalPeer) -> bool:
        """Whether ``peer`` holds this peer's state (same fingerprint): only such peers can average with it."""
        return peer.peer_id == local.peer_id or peer.fingerprint == local.fingerprint

    def peers_ahead(self, records: Sequence[PeerRecord], local: LocalPeer, now: float) -> list[PeerRecord]:
        """Credible peers (able to share state: not clients) that already took steps beyond this peer's."""
        return [
            peer for peer in records if peer.step > local.step and not peer.client_mode and self.is_credible(peer, now)
        ]

    def steps_behind(self, records: Sequence[PeerRecord], local: LocalPeer, now: float) -> int:
        """How many steps the most advanced credible peer is ahead of this one (0 if none is)."""
        ahead = self.peers_ahead(records, local, now)
        return max((peer.step for peer in ahead), default=local.step) - local.step

    def _partners(self, records: Sequence[PeerRecord], local: LocalPeer) -> list[PeerRecord]:
        """Live peers at this peer's step with its state, plus round mates whose record predates that step."""
        partners = [
            peer for peer in records if peer.step == local.step and self.is_live(peer) and self.same_state(peer, local)
        ]
        for peer in records:
            stepped_at = self.round_mates.get(peer.peer_id)
            if peer.step == local.step - 1 and stepped_at is not None and peer.time < stepped_at and self.is_live(peer):
                partners.append(peer)
        return partners

    def expected_in_round(self, records: Sequence[PeerRecord], local: LocalPeer) -> list[PeerRecord]:
        """Peers to wait for in this step's group.

        This one, its round mates, peers with samples at this step, peers that arrived at it (by a download) after
        this peer did, and, for the collaboration's very first step (or this peer's first step after a start from a
        checkpoint), every peer present. Other peers without samples (idle, or downloading) are not waited for: if
        they train, their samples show up in time for a later step. The first step is the exception, because peers
        that start together would otherwise race: the fastest one steps alone before the others report samples.
        Waiting costs at most one matchmaking window for a peer that never comes (it is then marked absent).
        Only peers with this peer's fingerprint are expected: the others cannot join its group.
        """
        arrived_after = self.reached_step_at
        global_step = max([local.step] + [peer.step for peer in records if not peer.client_mode])
        first_step = global_step == local.step and (local.step == 0 or arrived_after is None)
        return [
            peer
            for peer in self._partners(records, local)
            if peer.peer_id == local.peer_id
            or first_step
            or peer.samples > 0
            or peer.peer_id in self.round_mates
            or (arrived_after is not None and peer.time > arrived_after)
        ]

    def samples_toward_step(self, records: Sequence[PeerRecord], local: LocalPeer) -> int:
        """Samples toward this peer's next step: its own plus those of live peers at its step with its state."""
        others = sum(
            peer.samples
            for peer in records
            if peer.peer_id != local.peer_id
            and peer.step == local.step
            and self.is_live(peer)
            and self.same_state(peer, local)
        )
        return others + local.samples

    def estimated_samples(self, records: Sequence[PeerRecord], local: LocalPeer, now: float) -> float:
        """Samples toward this peer's next step by ``now``, extrapolating each partner's count by its speed.

        A round mate whose record still shows the previous step (the view predates that step) is counted from the
        moment of that step.
        """
        estimate = float(local.samples)
        for peer in self._partners(records, local):
            if peer.peer_id == local.peer_id:
                continue
            if peer.step == local.step:
                estimate += peer.samples + max(0.0, now - peer.time) * peer.samples_per_second
            else:
                estimate += max(0.0, now - self.round_mates[peer.peer_id]) * peer.samples_per_second
        return estimate

    def fork(self, records: Sequence[PeerRecord], local: LocalPeer, now: float) -> Fork | None:
        """The fork at this peer's step among live, credible records (this peer's included), if any."""
        return find_fork(
            (
                peer
                for peer in records
                if peer.peer_id == local.peer_id or (self.is_live(peer) and self.is_credible(peer, now))
            ),
            local.step,
        )

    def losing_fork(self, records: Sequence[PeerRecord], local: LocalPeer, now: float) -> Fork | None:
        """The fork this peer is on a losing side of (it must download the winner's state), if any."""
        fork = self.fork(records, local, now)
        return fork if fork is not None and fork.loses(local.fingerprint) else None

    # ------------------------------------------------------------------ decisions

    def before_accumulating(
        self, records: Sequence[PeerRecord], local: LocalPeer, now: float, may_download: bool
    ) -> Decision:
        """At every ``step()``, on the background view: download first, or accumulate this micro-batch?"""
        if not may_download:
            return Decision(Action.ACCUMULATE)
        behind = self.steps_behind(records, local, now)
        if behind > self.step_tolerance:
            return Decision(Action.DOWNLOAD, reason=f"{behind} step(s) behind the collaboration")
        fork = self.losing_fork(records, local, now)
        if fork is not None:
            return Decision(Action.DOWNLOAD, reason=f"replicas forked at {fork.describe()}", fork=fork)
        return Decision(Action.ACCUMULATE)

    def should_act(self, records: Sequence[PeerRecord], local: LocalPeer, now: float) -> bool:
        """On a fresh view: whether to plan a step now (target reached, peers ahead, or on a losing fork side)."""
        return (
            self.samples_toward_step(records, local) >= self.target_batch_size
            or bool(self.peers_ahead(records, local, now))
            or self.losing_fork(records, local, now) is not None
        )

    def plan_step(self, records: Sequence[PeerRecord], local: LocalPeer, now: float, may_download: bool) -> Decision:
        """On a fresh view in which :meth:`should_act` holds: what this peer does about its step."""
        ahead = self.peers_ahead(records, local, now)
        if ahead:
            if may_download:
                return Decision(Action.DOWNLOAD, reason=f"{len(ahead)} peer(s) already took step {local.step}")
            # the last download failed (no answer, or a partial state): stepping now would take a step the
            # collaboration already took, from other parameters, and leave this peer at the others' step number
            # with a different state
            return Decision(Action.WAIT, reason="peers are ahead; waiting for the next download attempt")
        fork = self.losing_fork(records, local, now)
        if fork is not None:
            if may_download:
                return Decision(Action.DOWNLOAD, reason=f"replicas forked at {fork.describe()}", fork=fork)
            return Decision(
                Action.WAIT, reason="on the losing side of a fork; waiting for the next download", fork=fork
            )
        if not self.may_retry(records, local, now):
            return Decision(Action.WAIT, reason=f"a groupmate of the broken round of step {local.step} may have it")
        group = self.expected_in_round(records, local)
        if (
            local.client_mode
            and not any(not peer.client_mode for peer in group)
            and any(not peer.client_mode for peer in records if peer.peer_id != local.peer_id)
        ):
            # Nobody can download a client's state: had it stepped without a peer that accepts connections, it
            # would be a step ahead of them for good (they never download from clients)
            return Decision(Action.WAIT, reason=f"client waits for a peer that accepts connections at {local.step}")
        if len(group) <= 1:
            in_round = self.maybe_in_round(records, local, now)
            if in_round:
                return Decision(
                    Action.WAIT,
                    reason=f"{len(in_round)} peer(s) that found no group with this one at step {local.step} may be "
                    "in a round that counted it; waiting for their news before stepping alone",
                )
            return Decision(Action.STEP_ALONE, group=tuple(group))
        return Decision(Action.RUN_ROUND, group=tuple(group))

    def maybe_in_round(self, records: Sequence[PeerRecord], local: LocalPeer, now: float) -> list[PeerRecord]:
        """Peers that may be in a round that counted this peer although no group formed on its side.

        hivemind's matchmaking is not atomic either: a leader can assemble a group with a follower whose own request
        timed out meanwhile (a slow reply on a loaded machine). That follower sees "could not find a group"; the
        others sit in an all-reduce that waits for its parts until their averaging timeout. Stepping alone then
        would take the step without them, and every later one too, until they download. So, for one round's time
        after such a round, the peers that were accumulating toward the same step and have published nothing since
        are waited for: once their round fails they publish news and are expected again; if they took the step
        without this peer, they are ahead and it downloads; if they crashed, the wait ends with the window.
        """
        if self.no_group is None:
            return []
        step, peers, until = self.no_group
        if step != local.step or now >= until:
            self.no_group = None
            return []
        return [
            peer for peer in records if peer.peer_id in peers and peer.step == step and peer.time <= peers[peer.peer_id]
        ]

    def may_retry(self, records: Sequence[PeerRecord], local: LocalPeer, now: float) -> bool:
        """After a round that broke here once its all-reduce had begun: whether this step may be tried again.

        hivemind's all-reduce is not atomic: groupmates that got all their parts applied the round. So only if no
        peer of that round took the step: each must show news at this step since the failure, or be gone. One
        that took it shows the next step, and this peer downloads (``peers_ahead`` comes first). A silent one (it
        may have crashed in the round) is waited for at most ``retry_window``.
        """
        if self.unsettled is None:
            return True
        step, mates, failed_at = self.unsettled
        if step != local.step:
            self.unsettled = None
            return True
        latest = {peer.peer_id: peer for peer in records}
        silent = [
            peer_id
            for peer_id in mates
            if peer_id != local.peer_id
            and peer_id in latest
            and not (latest[peer_id].step == step and latest[peer_id].time > failed_at)
        ]
        if silent and now < failed_at + self.retry_window:
            return False
        self.unsettled = None
        return True

    def before_leaving(
        self,
        records: Sequence[PeerRecord],
        local: LocalPeer,
        now: float,
        mates: Iterable[bytes],
        may_download: bool,
        silent_for: float = float("inf"),
    ) -> Decision:
        """When this peer leaves: may it go now, or must its last step be settled first?

        A fork at the last step of training would never heal (nobody trains on to notice it), so a leaving peer
        settles it: on the losing side it downloads the kept state (``DOWNLOAD``; ``WAIT`` while its download is
        backed off); on the winning side it stays (``WAIT``) while the losing side downloads from it. It also stays
        while a peer of its last round (``mates``) or one that was expected in a round and did not come (it may
        still take the steps this one took on its own, and fork) is behind; it serves its state meanwhile, so such a
        peer finds it ahead and downloads. A peer that did not come is waited for only while its record is younger
        than ``silent_for`` (a round's time: it may still be in a round of its own, e.g. one that formed only on
        its side); one silent for longer has crashed or stopped. The engine bounds the wait.

        Args:
            records: a fresh view.
            local: this peer.
            now: the DHT time.
            mates: the peers of this peer's last round.
            may_download: whether the download back-off allows a download now.
            silent_for: how long a peer that did not come may have been silent and still be waited for.
        """
        fork = self.fork(records, local, now)
        if fork is not None:
            if not fork.loses(local.fingerprint):
                return Decision(
                    Action.WAIT, reason=f"the other side of a fork at {fork.describe()} downloads from here", fork=fork
                )
            if may_download:
                return Decision(Action.DOWNLOAD, reason=f"replicas forked at {fork.describe()}", fork=fork)
            return Decision(
                Action.WAIT, reason="on the losing side of a fork; waiting for the next download", fork=fork
            )
        mates = set(mates)
        behind = [
            peer
            for peer in records
            if peer.peer_id != local.peer_id
            and (
                (peer.peer_id in mates and peer.step < local.step)
                or (peer.peer_id in self.absent and peer.step < local.step and now - peer.time < silent_for)
            )
        ]
        if behind:
            return Decision(Action.WAIT, reason=f"{len(behind)} peer(s) behind step {local.step} may still take it")
        return Decision(Action.LEAVE)

    # ------------------------------------------------------------------ what happened

    def record_step(self, participants: Iterable[bytes], now: float) -> None:
        """A step was applied (alone or in a round) with these participants (this peer included)."""
        self.reached_step_at = now
        self.round_mates = dict.fromkeys(participants, now)
        self.unsettled = None
        self.no_group = None

    def record_round(self, group: Sequence[PeerRecord], gathered: Iterable[bytes]) -> None:
        """A round completed with the ``gathered`` peers: expected ones that did not come are absent until news."""
        came = set(gathered)
        for peer in group:
            if peer.peer_id not in came:
                self.absent[peer.peer_id] = peer.time
        for peer_id in came:
            self.absent.pop(peer_id, None)

    def record_no_group(self, group: Sequence[PeerRecord], local: LocalPeer, now: float) -> None:
        """No group formed: nobody expected came; do not wait for them again until they publish news. Those that
        were accumulating toward this step may be in a round that counted this peer: no step alone for
        ``no_group_window`` unless they publish news first (:meth:`maybe_in_round`)."""
        self.record_round(group, [local.peer_id])
        accumulating = {
            peer.peer_id: peer.time
            for peer in group
            if peer.peer_id != local.peer_id and peer.step == local.step and peer.samples > 0
        }
        if accumulating and self.no_group_window > 0:
            self.no_group = (local.step, accumulating, now + self.no_group_window)

    def record_broken_round(self, step: int, group: Sequence[PeerRecord], now: float) -> None:
        """The round broke here after its all-reduce began: some groupmates may have applied it."""
        self.unsettled = (step, frozenset(peer.peer_id for peer in group), now)

    def record_download(self, records: Sequence[PeerRecord], step: int, now: float) -> None:
        """A state of ``step`` was loaded. Peers last seen one step earlier most likely produced it and are at
        ``step`` too, as are those seen there: count them in the next group until their records catch up (as after
        a step taken together).

        Distrust ends for records the download explains (at ``step`` or behind); an unchanged record that still
        claims a later step stays distrusted: believed again at once, a forged one made a peer that fell behind try
        it again after every real download, and each try blocked it, missing the others' rounds, until it fell
        behind again (the hostile-records test under load).
        """
        self.reached_step_at = now
        # peers already at ``step`` hold this state too (they produced or downloaded it) and train toward the next
        # step: waited for as well. Otherwise, when their record still showed no samples, this peer filled the target
        # alone and stepped alone while they did the same (two fast peers forked at the last step under load).
        self.round_mates = {peer.peer_id: now for peer in records if peer.step in (step - 1, step)}
        latest = {peer.peer_id: peer for peer in records}
        self.unbacked = {
            peer_id: claim
            for peer_id, claim in self.unbacked.items()
            if peer_id in latest and latest[peer_id].time == claim[0] and latest[peer_id].step > step
        }
        self.unsettled = None
        self.no_group = None

    def record_refused_download(
        self, records: Sequence[PeerRecord], local: LocalPeer, now: float, retry_at: float, fork: Fork | None = None
    ) -> None:
        """No peer served the state that records ahead of (or forked from) this peer claim: distrust those records
        until they change or until ``retry_at`` (the download back-off), so that a forged record cannot make this
        peer reload again and again, discarding its work each time. An unchanged record refused again is distrusted
        twice as long as the last time (up to ``max_distrust``)."""
        present = {peer.peer_id for peer in records}
        self.unbacked = {peer_id: claim for peer_id, claim in self.unbacked.items() if peer_id in present}
        claimants = [peer for peer in records if peer.step > local.step and not peer.client_mode]
        if fork is not None:
            winners = set(fork.sides.get(fork.winner, ()))
            claimants += [peer for peer in records if peer.peer_id in winners and peer.step == fork.step]
        backoff = max(0.0, retry_at - now)
        for peer in claimants:
            if peer.peer_id == local.peer_id:
                continue
            earlier = self.unbacked.get(peer.peer_id)
            again = earlier is not None and earlier[0] == peer.time  # the same record, refused once more
            distrust = min(max(backoff, 2 * earlier[2]), self.max_distrust) if again and earlier else backoff
            self.unbacked[peer.peer_id] = (peer.time, now + distrust, distrust)


__all__ = ["Action", "Decision", "Fork", "LocalPeer", "RoundPlanner", "find_fork"]
