"""Requirement 9: collaboration metrics go to ``accelerator.log`` when trackers exist, and to a tqdm bar (main process).

A multi-peer run with a tracker (ETA and peer count with three peers) is checked in ``test_accelerate_launch_runs``.
"""

from __future__ import annotations

import pytest
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker

from accelerate_collab import METRIC_NAMES
from tests.support.accelerate_inprocess import collaborative_peer, loader, train

TARGET = 32


class ListTracker(GeneralTracker):
    name = "list"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self):
        super().__init__()
        self.logged: list[tuple[int | None, dict]] = []

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values: dict) -> None:
        pass

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self.logged.append((step, dict(values)))


def _train(accelerator, dht, run_id, updates=3, **peer_kwargs):
    model, optimizer, scheduler = collaborative_peer(accelerator, dht, run_id, TARGET, **peer_kwargs)
    model, optimizer, data, scheduler = accelerator.prepare(model, optimizer, loader(64, 8), scheduler)
    try:
        return train(accelerator, model, optimizer, scheduler, data, updates=updates)
    finally:
        optimizer.shutdown()


def test_metrics_logged_to_trackers_once_per_collaborative_step(dht, run_id, capsys):
    tracker = ListTracker()
    accelerator = Accelerator(log_with=[tracker])
    accelerator.init_trackers("collab-metrics")
    _train(accelerator, dht, run_id, progress_bar=True)
    assert [step for step, _ in tracker.logged] == [1, 2, 3]  # step = the collaborative step
    for step, values in tracker.logged:
        assert set(values) == set(METRIC_NAMES)
        assert values["collab/eta_seconds"] >= 0
        assert values["collab/step"] == step and values["collab/peers"] == 1
        assert values["collab/last_round_samples"] == TARGET
        assert values["collab/samples_per_second"] > 0
    bar = capsys.readouterr().err
    assert "collaborative step 3: 100%" in bar and "32/32 samples" in bar  # the last step, full
    assert "1 peer," in bar and "samples/s" in bar and "ETA" in bar
    assert "collaborative step 3.0" not in bar  # an integer step


@pytest.mark.parametrize("with_trackers", [False, True], ids=["no-trackers", "log_metrics=False"])
def test_no_logging_without_trackers_or_when_disabled(dht, run_id, monkeypatch, with_trackers, capsys):
    tracker = ListTracker()
    accelerator = Accelerator(log_with=[tracker] if with_trackers else None)
    if with_trackers:
        accelerator.init_trackers("collab-metrics")
    calls = []
    monkeypatch.setattr(accelerator, "log", lambda *args, **kwargs: calls.append((args, kwargs)))
    trained = _train(accelerator, dht, run_id, log_metrics=not with_trackers, progress_bar=False)
    assert trained.optimizer.collaborative_step == 3
    assert calls == [] and tracker.logged == []
    assert "collaborative step" not in capsys.readouterr().err  # progress_bar=False: no bar


def test_a_step_taken_between_redraws_is_shown_full_at_the_next_redraw():
    """Steps faster than the redraw period: the redraw after one shows it completed, not the next step's start."""
    from accelerate_collab.metrics import bar_frame

    assert bar_frame(7, 0, 128, taken_undrawn=7) == (7, 128)
    assert bar_frame(7, 40, 128, taken_undrawn=None) == (8, 40)  # shown already (or downloaded): the step being built
    assert bar_frame(7, 300, 128, taken_undrawn=None) == (8, 128)  # never more than full
