"""The round planner on fabricated views: every decision of the engine, including the failure orders that used to
fork the replicas (issue 11's demo failure and partition), without a network or a clock."""

from __future__ import annotations

import pytest

from collab_core.planner import Action, LocalPeer, RoundPlanner, find_fork
from collab_core.records import PeerRecord

TARGET = 100
FP_A, FP_B, FP_C = "a" * 16, "b" * 16, "c" * 16
ME, P1, P2, P3 = b"me", b"p1", b"p2", b"p3"
NOW = 1000.0


def rec(peer_id, step, samples=0, fp=FP_A, *, time=NOW - 1, speed=10.0, client=False) -> PeerRecord:
    return PeerRecord(peer_id, step, samples, speed, time, client, fp)


def me(step, samples=0, fp=FP_A, client=False) -> tuple[LocalPeer, PeerRecord]:
    """This peer as the planner sees it, and its own record in the view (always current)."""
    return LocalPeer(ME, step, samples, fp, client), rec(ME, step, samples, fp, time=NOW, client=client)


def planner(**kwargs) -> RoundPlanner:
    return RoundPlanner(
        TARGET,
        kwargs.pop("step_tolerance", 1),
        retry_window=kwargs.pop("retry_window", 4.0),
        no_group_window=kwargs.pop("no_group_window", 0.0),
        max_distrust=kwargs.pop("max_distrust", float("inf")),
    )


def ids(records) -> set[bytes]:
    return {record.peer_id for record in records}


# ------------------------------------------------------------------------------------------ targets and groups


def test_below_target_it_accumulates_and_does_not_act():
    local, mine = me(3, 40)
    view = [mine, rec(P1, 3, 30)]
    p = planner()
    assert p.before_accumulating(view, local, NOW, may_download=True).action is Action.ACCUMULATE
    assert p.samples_toward_step(view, local) == 70
    assert not p.should_act(view, local, NOW)


def test_target_reached_runs_a_round_with_every_peer_that_has_samples():
    local, mine = me(3, 40)
    # p3 is idle at this step since before this peer got there: not waited for
    view = [mine, rec(P1, 3, 30), rec(P2, 3, 40), rec(P3, 3, 0, time=NOW - 9)]
    p = planner()
    p.record_step([ME], NOW - 5)
    assert p.should_act(view, local, NOW)
    decision = p.plan_step(view, local, NOW, may_download=True)
    assert decision.action is Action.RUN_ROUND
    assert ids(decision.group) == {ME, P1, P2}


def test_alone_at_its_step_it_steps_alone():
    local, mine = me(3, 120)
    p = planner()
    p.record_step([ME], NOW - 5)
    assert p.plan_step([mine, rec(P1, 2, 50, client=True)], local, NOW, True).action is Action.STEP_ALONE


def test_collaborations_first_step_waits_for_every_present_peer():
    """Peers that start together must not race: at step 0 idle peers are expected too."""
    local, mine = me(0, 120)
    view = [mine, rec(P1, 0, 0), rec(P2, 0, 0)]
    assert ids(planner().plan_step(view, local, NOW, True).group) == {ME, P1, P2}


def test_peer_that_missed_a_round_is_not_expected_until_it_publishes_news():
    local, mine = me(3, 120)
    p = planner()
    p.record_step([ME, P1], NOW - 10)
    late = rec(P1, 3, 20, time=NOW - 2)
    p.record_no_group([mine, late], local, NOW)
    assert p.plan_step([mine, late], local, NOW, True).action is Action.STEP_ALONE
    fresh = rec(P1, 3, 30, time=NOW - 1)
    assert ids(p.plan_step([mine, fresh], local, NOW, True).group) == {ME, P1}


def test_after_no_group_it_does_not_step_alone_while_the_others_may_be_in_a_round_that_counted_it():
    """WAN test under load: hivemind's leader assembled a group with this peer, whose own join request had timed
    out ("could not find a group"); the others sat in an all-reduce waiting for its parts while it stepped alone,
    twice, and they downloaded. For one round's time it waits for their news instead."""
    local, mine = me(3, 120)
    p = planner(no_group_window=12.0)
    p.record_step([ME, P1, P2], NOW - 10)
    p1, p2 = rec(P1, 3, 40, time=NOW - 1), rec(P2, 3, 30, time=NOW - 1)
    p.record_no_group([mine, p1, p2], local, NOW)
    view = [mine, p1, p2]
    decision = p.plan_step(view, local, NOW + 1, True)
    assert decision.action is Action.WAIT and "may be in a round" in decision.reason
    # their round failed (they never got this peer's parts): they publish news and are expected again
    news = [mine, rec(P1, 3, 40, time=NOW + 5), rec(P2, 3, 30, time=NOW + 5)]
    assert ids(p.plan_step(news, local, NOW + 6, True).group) == {ME, P1, P2}
    # had they taken the step without this peer, it downloads
    ahead = [mine, rec(P1, 4, 0, time=NOW + 5), p2]
    assert p.plan_step(ahead, local, NOW + 6, True).action is Action.DOWNLOAD
    # had they crashed, the wait ends with the window
    assert p.plan_step(view, local, NOW + 12, True).action is Action.STEP_ALONE


def test_after_no_group_idle_peers_and_later_steps_are_not_waited_for():
    local, mine = me(3, 120)
    p = planner(no_group_window=12.0)
    idle = rec(P1, 3, 0, time=NOW - 1)  # it had nothing toward this step: it was in no round
    p.record_no_group([mine, idle], local, NOW)
    assert p.plan_step([mine, idle], local, NOW + 1, True).action is Action.STEP_ALONE
    busy = rec(P1, 3, 50, time=NOW - 1)
    p.record_no_group([mine, busy], local, NOW)
    p.record_step([ME], NOW + 2)  # a step taken (e.g. after the window): the wait was about the old step only
    local, mine = me(4, 120)
    assert p.plan_step([mine, busy], local, NOW + 3, True).action is Action.STEP_ALONE
    unlimited = planner()  # no_group_window 0: no wait at all
    unlimited.record_no_group([mine, rec(P1, 4, 50, time=NOW - 1)], local, NOW)
    assert unlimited.plan_step([mine, rec(P1, 4, 50, time=NOW - 1)], local, NOW + 1, True).action is (Action.STEP_ALONE)


def test_round_mate_whose_record_predates_the_step_is_expected_and_extrapolated():
    """Failure order (c): a groupmate's publication of the new step is delayed past this peer's next round."""
    local, mine = me(5, 60)
    p = planner()
    p.record_step([ME, P1], NOW - 2)
    stale = rec(P1, 4, 80, time=NOW - 3, speed=20.0)  # its record still shows the step both just took
    view = [mine, stale]
    assert p.estimated_samples(view, local, NOW) == pytest.approx(60 + 2 * 20.0)
    assert ids(p.expected_in_round(view, local)) == {ME, P1}


def test_client_waits_for_a_peer_that_accepts_connections():
    local, mine = me(3, 120, client=True)
    view = [mine, rec(P1, 3, 0, time=NOW - 9), rec(P2, 3, 30, client=True)]  # the server is idle since before
    p = planner()
    p.record_step([ME], NOW - 5)
    assert p.plan_step(view, local, NOW, True).action is Action.WAIT


# ------------------------------------------------------------------------------------------ behind, ahead, downloads


@pytest.mark.parametrize(
    ("tolerance", "others_at", "expected"),
    [(1, 4, Action.ACCUMULATE), (1, 5, Action.DOWNLOAD), (0, 4, Action.DOWNLOAD), (2, 5, Action.ACCUMULATE)],
)
def test_step_tolerance_decides_when_a_lagging_peer_downloads(tolerance, others_at, expected):
    local, mine = me(3, 10)
    view = [mine, rec(P1, others_at, 10)]
    p = planner(step_tolerance=tolerance)
    assert p.before_accumulating(view, local, NOW, may_download=True).action is expected


def test_peer_ahead_means_download_never_a_step_alone():
    local, mine = me(3, 120)
    view = [mine, rec(P1, 4, 0)]
    p = planner()
    assert p.should_act(view, local, NOW)
    assert p.plan_step(view, local, NOW, may_download=True).action is Action.DOWNLOAD
    # the last download failed and backs off: it waits, it does not take the step the others already took
    assert p.plan_step(view, local, NOW, may_download=False).action is Action.WAIT


def test_clients_ahead_are_not_followed():
    local, mine = me(3, 120)
    p = planner()
    p.record_step([ME], NOW - 5)
    assert p.plan_step([mine, rec(P1, 7, 0, client=True)], local, NOW, True).action is Action.STEP_ALONE


def test_refused_download_distrusts_records_ahead_only_until_the_back_off_ends():
    """The partition case: idle peers ahead publish nothing new; after a failed download during the cut their
    records must be believed again once the back-off ends, or the peer trains on alone from its stale state."""
    local, mine = me(3, 120)
    idle_ahead = rec(P1, 9, 0, time=NOW - 30)
    view = [mine, idle_ahead]
    p = planner()
    p.record_refused_download(view, local, NOW, retry_at=NOW + 8)
    assert not p.peers_ahead(view, local, NOW + 1)
    assert p.plan_step(view, local, NOW + 1, may_download=False).action is not Action.DOWNLOAD
    assert p.steps_behind(view, local, NOW + 8) == 6
    assert p.before_accumulating(view, local, NOW + 8, may_download=True).action is Action.DOWNLOAD
    # a record that changes is believed at once
    assert p.peers_ahead([mine, rec(P1, 9, 0, time=NOW - 29)], local, NOW + 1)


# ------------------------------------------------------------------------------------------ broken rounds


def test_after_a_broken_round_it_retries_only_once_no_groupmate_can_have_taken_the_step():
    """Failure orders (a)/(b): the all-reduce broke here after it began; groupmates may have applied it."""
    local, mine = me(3, 120)
    p = planner(retry_window=4.0)
    group = [mine, rec(P1, 3, 50), rec(P2, 3, 50)]
    p.record_broken_round(3, group, NOW)
    silent = [mine, rec(P1, 3, 50, time=NOW - 1), rec(P2, 3, 50, time=NOW - 1)]
    assert p.plan_step(silent, local, NOW + 1, True).action is Action.WAIT
    # one groupmate shows it took the step: download, whatever the other shows
    assert p.plan_step([*silent[:2], rec(P2, 4, 0, time=NOW + 1)], local, NOW + 1, True).action is Action.DOWNLOAD
    # both failed too (news at step 3 since the failure): retry now
    failed_too = [mine, rec(P1, 3, 50, time=NOW + 0.5), rec(P2, 3, 50, time=NOW + 0.5)]
    assert p.plan_step(failed_too, local, NOW + 1, True).action is Action.RUN_ROUND


def test_a_silent_groupmate_of_a_broken_round_is_waited_for_at_most_the_retry_window():
    local, mine = me(3, 120)
    p = planner(retry_window=4.0)
    crashed = rec(P1, 3, 50, time=NOW - 1)
    p.record_broken_round(3, [mine, crashed], NOW)
    assert p.plan_step([mine, crashed], local, NOW + 3.9, True).action is Action.WAIT
    assert p.plan_step([mine, crashed], local, NOW + 4.1, True).action is not Action.WAIT


def test_issue_11_demo_failure_asymmetric_round_of_step_31():
    """The demo run that ended 1.4e-2 apart: peer0 found no group, peer1's all-reduce broke at 85%. peer0 then stepped
    alone to 32. peer1 must download peer0's state, and must never take step 31 alone."""
    p0, p1 = planner(retry_window=4.0), planner(retry_window=4.0)
    local0, mine0 = LocalPeer(P1, 31, 128, FP_A), rec(P1, 31, 128, time=NOW)
    local1, mine1 = LocalPeer(ME, 31, 128, FP_A), rec(ME, 31, 128, time=NOW)
    p0.record_no_group([mine0, rec(ME, 31, 128, time=NOW - 1)], local0, NOW)
    p1.record_broken_round(31, [mine1, rec(P1, 31, 128, time=NOW - 1)], NOW)
    # peer1 sees peer0 silent at 31 -> waits, while peer0 (peer1 absent) steps alone
    assert p1.plan_step([mine1, rec(P1, 31, 128, time=NOW - 1)], local1, NOW + 0.5, True).action is Action.WAIT
    assert p0.plan_step([mine0, rec(ME, 31, 128, time=NOW - 1)], local0, NOW + 0.5, True).action is Action.STEP_ALONE
    # peer0 publishes step 32: peer1 downloads
    assert p1.plan_step([mine1, rec(P1, 32, 0, FP_B, time=NOW + 1)], local1, NOW + 1, True).action is Action.DOWNLOAD


# ------------------------------------------------------------------------------------------ forks


def test_fork_two_against_one_the_single_replica_downloads_the_majority_state():
    local, mine = me(32, 10, FP_C)  # "c" > "a": it would win a tie, but not against two peers
    view = [mine, rec(P1, 32, 10, FP_A), rec(P2, 32, 10, FP_A)]
    p = planner()
    decision = p.before_accumulating(view, local, NOW, may_download=True)
    assert decision.action is Action.DOWNLOAD and decision.fork is not None
    assert decision.fork.winner == FP_A and decision.fork.sides[FP_C] == (ME,)
    # the majority side sees the same fork and does nothing about it
    majority = LocalPeer(P1, 32, 10, FP_A)
    assert p.before_accumulating(view, majority, NOW, may_download=True).action is Action.ACCUMULATE


def test_fork_tie_every_peer_computes_the_same_winner():
    a, b = rec(ME, 32, 10, FP_A, time=NOW), rec(P1, 32, 10, FP_B)
    assert find_fork([a, b], 32).winner == find_fork([b, a], 32).winner == FP_B
    p = planner()
    assert p.before_accumulating([a, b], LocalPeer(ME, 32, 10, FP_A), NOW, True).action is Action.DOWNLOAD
    assert p.before_accumulating([a, b], LocalPeer(P1, 32, 10, FP_B), NOW, True).action is Action.ACCUMULATE


def test_fork_side_that_no_peer_can_serve_loses():
    """Two clients against one server: only the server's state can be downloaded, so the clients follow it."""
    view = [rec(ME, 5, 0, FP_A, client=True, time=NOW), rec(P1, 5, 0, FP_A, client=True), rec(P2, 5, 0, FP_B)]
    assert find_fork(view, 5).winner == FP_B


def test_replicas_of_another_state_are_neither_counted_nor_expected():
    local, mine = me(32, 60, FP_A)
    view = [mine, rec(P1, 32, 60, FP_A), rec(P2, 32, 500, FP_C), rec(P3, 32, 500, FP_C)]
    p = planner()
    assert p.samples_toward_step(view, local) == 120
    # this peer loses the fork (2 against 2, "c" > "a") and must download before contributing
    assert p.plan_step(view, local, NOW, may_download=True).action is Action.DOWNLOAD
    winner = LocalPeer(P2, 32, 500, FP_C)
    assert ids(p.plan_step(view, winner, NOW, True).group) == {P2, P3}


def test_both_stepped_alone_to_the_same_step_the_fork_is_healed_not_averaged_over():
    """What the demo did after its asymmetric round: both peers took step 31 on their own. Same step, different
    fingerprints: the loser downloads at its next step() instead of both training on apart."""
    view = [rec(ME, 32, 8, FP_A, time=NOW), rec(P1, 32, 8, FP_B)]
    loser = planner().before_accumulating(view, LocalPeer(ME, 32, 8, FP_A), NOW, True)
    winner = planner().before_accumulating(view, LocalPeer(P1, 32, 8, FP_B), NOW, True)
    assert (loser.action, winner.action) == (Action.DOWNLOAD, Action.ACCUMULATE)


def test_forged_fingerprint_costs_one_refused_download_per_back_off_not_work_forever():
    local, mine = me(7, 10, FP_A)
    forged = rec(P1, 7, 10, FP_C, time=NOW - 1)
    view = [mine, forged]
    p = planner()
    decision = p.before_accumulating(view, local, NOW, True)
    assert decision.action is Action.DOWNLOAD  # it cannot know before trying
    p.record_refused_download(view, local, NOW, retry_at=NOW + 16, fork=decision.fork)
    assert p.fork(view, local, NOW + 1) is None
    assert p.before_accumulating(view, local, NOW + 1, True).action is Action.ACCUMULATE
    assert p.samples_toward_step(view, local) == 10  # and it never counted toward this peer's target
    assert p.before_accumulating(view, local, NOW + 16, True).action is Action.DOWNLOAD  # bounded back-off


def test_a_download_clears_distrust_it_explains_and_counts_the_producers_as_round_mates():
    local, mine = me(8, 0, FP_B)
    p = planner()
    p.record_refused_download([mine, rec(P1, 9, 0)], LocalPeer(ME, 7, 0, FP_A), NOW - 5, retry_at=NOW + 60)
    p.record_download([mine, rec(P1, 7, 40, time=NOW - 0.5), rec(P2, 8, 0)], 8, NOW)  # P1 published news
    assert p.unbacked == {} and set(p.round_mates) == {ME, P1, P2}  # (as after a step, this peer is one too)
    assert p.reached_step_at == NOW


def test_after_a_download_the_peers_at_that_step_are_expected_even_without_samples():
    """Two fast peers under load: one downloaded the step the other was at, and each filled the target alone; the
    downloader must wait for the peer it got the state from, not step alone beside it."""
    p = planner()
    producer = rec(P1, 4, 0, time=NOW - 0.5)  # just stepped: no samples yet, record older than the download
    p.record_download([rec(ME, 3, time=NOW - 1), producer], 4, NOW)
    local, mine = me(4, 120)
    decision = p.plan_step([mine, producer], local, NOW + 1, True)
    assert decision.action is Action.RUN_ROUND and ids(decision.group) == {ME, P1}


def test_a_forged_record_stays_distrusted_across_real_downloads_and_longer_each_time():
    """Hostile-records test under load: a forged record far ahead was believed again after every real download;
    each try blocked the peer while the others' round waited for it, so it missed every round and fell behind."""
    forged = rec(P1, 1_000_000, 0, time=NOW - 30)
    local, mine = me(1)
    p = planner(max_distrust=20.0)
    p.record_refused_download([mine, forged], local, NOW, retry_at=NOW + 2)
    assert not p.peers_ahead([mine, forged], local, NOW + 1)
    honest = rec(P2, 1)  # it fell behind; a real download of step 2
    p.record_download([mine, forged, honest], 2, NOW + 1.5)
    local, mine = me(2)
    assert not p.peers_ahead([mine, forged], local, NOW + 1.9)  # still distrusted after the download
    assert p.peers_ahead([mine, forged], local, NOW + 2)  # until its back-off ends: then tried once more
    p.record_refused_download([mine, forged], local, NOW + 2, retry_at=NOW + 4)
    assert not p.peers_ahead([mine, forged], local, NOW + 5.9)  # refused again: twice as long (4 s)
    assert p.peers_ahead([mine, forged], local, NOW + 6)
    for _ in range(5):
        p.record_refused_download([mine, forged], local, NOW + 10, retry_at=NOW + 12)
    assert not p.peers_ahead([mine, forged], local, NOW + 29.9)
    assert p.peers_ahead([mine, forged], local, NOW + 30)  # capped at max_distrust (20 s)
    news = rec(P1, 1_000_000, 0, time=NOW + 11)  # a changed record is believed (then tested) at once
    assert p.peers_ahead([mine, news], local, NOW + 12)


def test_records_without_fingerprint_are_no_fork():
    assert find_fork([rec(ME, 3, 0, FP_A, time=NOW), rec(P1, 3, 0, "")], 3) is None


# ------------------------------------------------------------------------------------------------- leaving


def test_leaving_after_the_last_step_it_waits_for_a_groupmate_still_behind():
    local, mine = me(8)
    p = planner()
    p.record_step([ME, P1], NOW - 1)
    assert p.before_leaving([mine, rec(P1, 7, 30)], local, NOW, [P1], may_download=True).action is Action.WAIT
    assert p.before_leaving([mine, rec(P1, 8)], local, NOW, [P1], may_download=True).action is Action.LEAVE
    assert p.before_leaving([mine], local, NOW, [P1], may_download=True).action is Action.LEAVE  # it left


def test_leaving_after_stepping_alone_it_waits_for_the_peer_that_did_not_come_then_settles_the_fork():
    """The asymmetric round of the last step: here "could not find a group", so this peer stepped alone; the other
    peer's round broke mid-way and it steps alone too. Nobody trains on to see the fork: leaving must settle it."""
    p = planner()
    local, mine = me(7, 100)
    other_at_7 = rec(P1, 7, 60)
    p.record_no_group([mine, other_at_7], local, NOW)  # P1 expected, never came: absent until news
    p.record_step([ME], NOW)
    local, mine = me(8, fp=FP_B)
    decision = p.before_leaving([mine, other_at_7], local, NOW + 1, [], may_download=True)
    assert decision.action is Action.WAIT and "behind step 8" in decision.reason
    # P1 took step 7 alone as well (news: a newer record), with another state: a fork at the last step
    forked = rec(P1, 8, fp=FP_A, time=NOW + 2)
    decision = p.before_leaving([mine, forked], local, NOW + 3, [], may_download=True)
    assert decision.action is Action.WAIT and decision.fork is not None  # FP_B wins the tie: P1 downloads from here
    local_a, mine_a = LocalPeer(ME, 8, 0, FP_A), rec(ME, 8, fp=FP_A, time=NOW + 3)
    decision = p.before_leaving([mine_a, rec(P1, 8, fp=FP_B, time=NOW + 2)], local_a, NOW + 3, [], may_download=True)
    assert decision.action is Action.DOWNLOAD and decision.fork.winner == FP_B  # or this one is the loser
    assert (
        p.before_leaving([mine_a, rec(P1, 8, fp=FP_B, time=NOW + 2)], local_a, NOW + 3, [], may_download=False).action
        is Action.WAIT
    )
    settled = rec(P1, 8, fp=FP_B, time=NOW + 4)
    assert p.before_leaving([mine, settled], local, NOW + 5, [], may_download=True).action is Action.LEAVE


def test_leaving_it_does_not_wait_for_idle_peers_behind_nor_for_absent_ones_silent_for_longer_than_a_round():
    p = planner()
    local, mine = me(8)
    p.absent[P2] = NOW - 30  # missed a round of step 5 and went silent (crashed)
    view = [mine, rec(P1, 7, 0), rec(P2, 5, 10, time=NOW - 30)]
    assert p.before_leaving(view, local, NOW, [], may_download=True, silent_for=13).action is Action.LEAVE


def test_leaving_after_racing_ahead_alone_it_waits_for_the_peer_stuck_in_its_own_round():
    """make demo under load: the round of step 32 formed on P1's side only (hivemind), so this peer found no group,
    then stepped alone to the last step (40) within a second while P1 sat in its all-reduce. Leaving at once would
    let P1 take steps 32-40 alone from its own state, with nobody left to heal the fork: it must wait, serving, until
    P1 finds it ahead and downloads."""
    p = planner()
    local, mine = me(32, 296)
    p1_at_32 = rec(P1, 32, 296, time=NOW - 2)
    p.record_no_group([mine, p1_at_32], local, NOW)
    local, mine = me(40)
    assert p.before_leaving([mine, p1_at_32], local, NOW, [], may_download=True, silent_for=13).action is Action.WAIT
    caught_up = rec(P1, 40, time=NOW + 3)
    assert p.before_leaving([mine, caught_up], local, NOW + 3, [], may_download=True, silent_for=13).action is (
        Action.LEAVE
    )
