"""The scheduler stand-in shared by the Lightning strategy and the Accelerate wrapper, and the scheduler check."""

from __future__ import annotations

import pytest
import torch

from accelerate_collab import CollaborativeAcceleratedScheduler
from collab_core.scheduler import SchedulerDrivenByCollaboration, check_collaborative_scheduler


def _optimizer_and_scheduler() -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)


@pytest.mark.parametrize("stand_in", ["core", "accelerate"])
def test_the_trainers_step_does_nothing_and_everything_else_is_the_users_scheduler(stand_in):
    opt, scheduler = _optimizer_and_scheduler()
    wrapped = (
        SchedulerDrivenByCollaboration(scheduler)
        if stand_in == "core"
        else CollaborativeAcceleratedScheduler(scheduler, opt)
    )
    for _ in range(3):
        wrapped.step()  # what Lightning / Accelerate do after every optimizer step
    assert scheduler.last_epoch == 0 and opt.param_groups[0]["lr"] == 1.0
    opt.step()
    scheduler.step()  # what the collaboration does once per collaborative step
    assert wrapped.get_last_lr() == [0.5] and wrapped.last_epoch == 1
    saved = wrapped.state_dict()
    assert saved == scheduler.state_dict() and saved["last_epoch"] == 1
    scheduler.step()
    wrapped.load_state_dict(saved)
    assert scheduler.last_epoch == 1
    assert "StepLR" in repr(wrapped) and "last_epoch=1" in repr(wrapped)


def test_a_scheduler_stepping_on_a_metric_is_refused_with_the_fix():
    opt, _ = _optimizer_and_scheduler()
    with pytest.raises(ValueError, match="ReduceLROnPlateau.*LambdaLR"):
        check_collaborative_scheduler(torch.optim.lr_scheduler.ReduceLROnPlateau(opt))
    _, step_lr = _optimizer_and_scheduler()
    with pytest.raises(ValueError, match="monitored metric"):
        check_collaborative_scheduler(step_lr, steps_on_metric=True)


def test_a_scheduler_built_on_another_optimizer_is_refused():
    opt, _ = _optimizer_and_scheduler()
    _, other = _optimizer_and_scheduler()
    with pytest.raises(ValueError, match="scheduler is not built on this optimizer"):
        check_collaborative_scheduler(other, opt)
    check_collaborative_scheduler(None, opt)
    check_collaborative_scheduler(torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0), opt)
