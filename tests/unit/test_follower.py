"""``collab_core.follower.FollowerOptimizer`` and ``collab_core.local_peer.leader_outcome``: the pure decisions of a
peer's local processes, in one process (no torch.distributed, no network; the two-process protocol is in
``test_local_peer.py``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from collab_core.collaboration import StepOutcome, StepReport
from collab_core.follower import FollowerOptimizer
from collab_core.local_peer import LeaderOutcome, LocalGroup, LocalReplicas, leader_outcome


def _follower(reuse_grad_buffers: bool, grad_scaler=None, scheduler: bool = True):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step) if scheduler else None
    replicas = LocalReplicas(LocalGroup(1, is_main=False, device=torch.device("cpu")), opt, sched)
    follower = FollowerOptimizer(replicas, reuse_grad_buffers=reuse_grad_buffers, grad_scaler=grad_scaler)
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    return follower, model


def _grads_are_ones(model) -> bool:
    return all(p.grad is not None and bool((p.grad == 1).all()) for p in model.parameters())


@pytest.mark.parametrize("reuse", [False, True])
def test_zero_grad_keeps_reused_buffers_like_the_leader(reuse):
    follower, model = _follower(reuse)
    follower.zero_grad()
    assert _grads_are_ones(model) == reuse


@pytest.mark.parametrize(
    ("reuse", "changed", "cleared"),
    [(False, False, True), (False, True, True), (True, False, False), (True, True, True)],
)
def test_follow_takes_the_step_and_clears_gradients_where_the_leader_did(reuse, changed, cleared):
    follower, model = _follower(reuse)
    follower.follow(LeaderOutcome(updated=changed, changed=changed, step=7, num_peers=3))
    assert (follower.local_step, follower.num_peers) == (7, 3)
    assert _grads_are_ones(model) != cleared


def test_follow_takes_the_leaders_gradient_scale():
    scales = []
    scaler = SimpleNamespace(get_scale=lambda: 1024.0, update=scales.append)
    follower, _model = _follower(False, grad_scaler=scaler)
    follower.follow(LeaderOutcome(False, False, 0, 2, scale=512.0))
    follower.follow(LeaderOutcome(False, False, 0, 2, scale=1024.0))  # already the same: no update
    assert scales == [512.0]


def test_a_follower_never_steps():
    follower, _model = _follower(False)
    with pytest.raises(RuntimeError, match="does not step"):
        follower.step()


def test_checkpoints_in_the_collaborative_format_round_trip():
    follower, model = _follower(False)
    follower.opt.step()  # some momentum state
    follower.scheduler.step()
    follower.local_step = 5
    saved = follower.state_dict()
    assert saved["local_step"] == 5 and saved["scheduler"]["last_epoch"] == 1
    other, _ = _follower(False)
    # what a leader's CollaborativeOptimizer saves has more keys (fingerprint, scheme): they are the leader's
    other.load_state_dict({**saved, "fingerprint": "abc", "scheme": {}})
    assert other.local_step == 5 and other.scheduler.last_epoch == 1
    assert other.param_groups[0]["lr"] == follower.param_groups[0]["lr"] == 0.05
    assert len(other.state) == len(list(model.parameters()))
    other.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.3).state_dict())  # a plain optimizer state dict
    assert other.local_step == 5 and other.param_groups[0]["lr"] == 0.3


@pytest.mark.parametrize(
    ("outcome", "step_after", "local_update", "expected"),
    [
        (StepOutcome.ACCUMULATED, 4, False, (False, False, False)),
        (StepOutcome.ACCUMULATED, 4, True, (False, False, True)),  # DiLoCo's inner step
        (StepOutcome.UPDATED, 5, False, (True, True, True)),
        (StepOutcome.SKIPPED, 5, False, (False, True, True)),
        (StepOutcome.DOWNLOADED, 9, False, (False, True, True)),
        (StepOutcome.ROUND_FAILED, 4, False, (False, False, False)),
    ],
)
def test_leader_outcome_says_what_the_followers_must_take_over(outcome, step_after, local_update, expected):
    report = StepReport(outcome, step_before=4, step_after=step_after, local_update=local_update)
    collaborative = SimpleNamespace(
        last_step_report=report, local_step=step_after, collaboration_state=SimpleNamespace(num_peers=3)
    )
    result = leader_outcome(collaborative, scale=2.0)
    assert (result.updated, result.changed, result.params_changed) == expected
    assert (result.step, result.num_peers, result.scale, result.failed) == (step_after, 3, 2.0, False)
