"""``collab_core.reporting``: the rule for what people read (ETAs, rates, status lines), on fabricated inputs."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import pytest

from collab_core.reporting import (
    MAX_ETA_SECONDS,
    CollaborationProgress,
    ProgressSnapshot,
    RateMeter,
    StatusSnapshot,
    StatusThrottle,
    eta_seconds,
    format_eta,
    format_rate,
    sane_eta,
    status_line,
)

# ------------------------------------------------------------------------------------------------------- ETA


@pytest.mark.parametrize("seconds", [None, math.nan, math.inf, -math.inf, MAX_ETA_SECONDS + 1, 1.28e22])
def test_an_unknown_or_absurd_eta_says_unknown(seconds):
    assert sane_eta(seconds) is None
    assert format_eta(seconds) == "unknown"


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0.0, "0.0s"), (0.44, "0.4s"), (9.94, "9.9s"), (42.2, "42s"), (725, "12m05s"), (11040, "3h04m"), (-2, "0.0s")],
)
def test_a_known_eta_reads_like_a_duration(seconds, shown):
    assert format_eta(seconds) == shown


def test_eta_from_a_rate_is_unknown_without_a_measured_rate():
    # what hivemind does before any speed is measured: 256 samples / 1e-20 samples/s = 2.56e22 s
    assert eta_seconds(256, 1e-20) is None
    assert eta_seconds(256, 0.0) is None and eta_seconds(256, None) is None and eta_seconds(256, math.nan) is None
    assert eta_seconds(256, 128.0) == pytest.approx(2.0)
    assert eta_seconds(0, None) == 0.0  # nothing left: due now, whatever the rate
    assert eta_seconds(256, 128.0, bound=1.0) is None


def test_rates_read_at_a_human_precision():
    assert format_rate(None) == "unknown samples/s"
    assert format_rate(math.nan) == "unknown samples/s"
    assert format_rate(4.21) == "4.2 samples/s"
    assert format_rate(312.4) == "312 samples/s"


# ------------------------------------------------------------------------------------------------------- rate


def test_rate_is_unknown_until_the_observations_span_the_minimum():
    meter = RateMeter(window=5.0, min_span=1.0)
    assert meter.rate(now=0.0) is None
    meter.observe(0, now=0.0)
    meter.observe(32, now=0.001)  # one call a millisecond later: 32000 samples/s would be an artefact
    assert meter.rate(now=0.001) is None
    meter.observe(320, now=1.0)
    assert meter.rate(now=1.0) == pytest.approx(320.0)


def test_rate_is_measured_over_real_time_not_per_call():
    """Steady work, a 3 s pause (an averaging round), then two calls a millisecond apart: no spike."""
    meter = RateMeter(window=5.0, min_span=1.0)
    total = 0
    for i in range(101):  # 100 samples/s for 10 s, observed every 0.1 s
        meter.observe(total, now=i * 0.1)
        total += 10
    steady = meter.rate(now=10.0)
    assert steady == pytest.approx(100.0, rel=0.03)
    assert meter.rate(now=13.0) == pytest.approx(40.0, rel=0.05)  # paused: the rate goes down, in real time
    meter.observe(total, now=13.0)
    meter.observe(total + 32, now=13.001)
    assert meter.rate(now=13.001) <= steady  # the old two-point rate: 32 / 0.001 s = 32000 samples/s


def test_rate_does_not_depend_on_how_often_it_is_fed():
    often, rarely = RateMeter(), RateMeter()
    for i in range(201):  # 200 samples/s for 10 s
        t = i * 0.05
        often.observe(10 * i, now=t)
        if i % 10 == 0:
            rarely.observe(10 * i, now=t)
    assert often.rate(now=10.0) == pytest.approx(rarely.rate(now=10.0)) == pytest.approx(200.0)


def test_a_counter_that_goes_back_restarts_the_rate():
    meter = RateMeter(window=5.0, min_span=1.0)
    meter.observe(1000, now=0.0)
    meter.observe(2000, now=2.0)
    meter.observe(10, now=2.5)  # e.g. a restarted counter
    assert meter.rate(now=2.5) is None
    meter.reset()
    assert meter.rate(now=3.0) is None


def test_rate_meter_rejects_a_meaningless_window():
    with pytest.raises(ValueError, match="window"):
        RateMeter(window=0.0)
    with pytest.raises(ValueError, match="min_span"):
        RateMeter(window=1.0, min_span=2.0)


# ------------------------------------------------------------------------------------------------ status lines


def _run(throttle: StatusThrottle, snapshots: list[tuple[float, StatusSnapshot]]) -> list[tuple[str, ...]]:
    return [throttle.reasons(snapshot, now=t) for t, snapshot in snapshots]


def test_a_fast_solo_peer_gets_a_status_line_every_few_seconds_not_per_step():
    """40 steps/s for 20 s (the Lightning example alone): the old tracker logged all 800 refreshes at INFO."""
    throttle = StatusThrottle(periodic=True, every_steps=1000, min_seconds=5.0, idle_seconds=60.0)
    reasons = _run(throttle, [(i / 40, StatusSnapshot(step=i, peers=1)) for i in range(800)])
    shown = [i for i, found in enumerate(reasons) if found]
    assert reasons[0] == ("started",)
    assert len(shown) == 4  # at 0 s, 5 s, 10 s, 15 s
    assert all(b - a >= 5 * 40 for a, b in zip(shown, shown[1:], strict=False))


def test_every_n_steps_is_bounded_by_the_minimum_interval():
    throttle = StatusThrottle(periodic=True, every_steps=10, min_seconds=60.0, min_interval=1.0)
    reasons = _run(throttle, [(i / 100, StatusSnapshot(step=i, peers=1)) for i in range(1000)])  # 100 steps/s
    assert sum(bool(r) for r in reasons) == 10  # once a second, not 10 times a second


def test_peers_joining_or_leaving_downloads_and_failed_rounds_are_always_shown():
    throttle = StatusThrottle(periodic=False)
    snapshots = [
        (0.0, StatusSnapshot(step=0, peers=1)),
        (0.1, StatusSnapshot(step=0, peers=1)),
        (0.2, StatusSnapshot(step=0, peers=3)),
        (0.3, StatusSnapshot(step=1, peers=3)),
        (0.4, StatusSnapshot(step=1, peers=2)),
        (0.5, StatusSnapshot(step=9, peers=2, downloads=1)),
        (0.6, StatusSnapshot(step=9, peers=2, downloads=1, failed_rounds=1)),
        (0.7, StatusSnapshot(step=10, peers=2, downloads=1, failed_rounds=1)),
    ]
    assert _run(throttle, snapshots) == [
        (),  # events only: the first snapshot is not news (Lightning's bar shows the numbers)
        (),
        ("2 peers joined",),
        (),  # a step without news: DEBUG
        ("1 peer left",),
        ("downloaded the collaboration's state",),
        ("an averaging round failed (1 so far)",),
        (),
    ]


def test_an_idle_periodic_status_is_repeated_after_the_idle_interval():
    throttle = StatusThrottle(periodic=True, idle_seconds=30.0)
    snapshot = StatusSnapshot(step=5, peers=1)
    reasons = _run(throttle, [(t, snapshot) for t in (0.0, 10.0, 29.0, 31.0, 45.0)])
    assert [bool(r) for r in reasons] == [True, False, False, True, False]
    assert throttle.level(snapshot, now=62.0) == logging.INFO
    assert throttle.level(snapshot, now=63.0) == logging.DEBUG


def test_status_line_names_the_numbers_and_the_news():
    shown = ProgressSnapshot(step=12, peers=2, samples=96, target=256, samples_per_second=310.2, eta_seconds=0.52)
    assert status_line("digits", shown, ("1 peer joined",)) == (
        "digits: step 12, 96/256 samples, 2 peers, 310 samples/s, ETA 0.5s (1 peer joined)"
    )
    unknown = ProgressSnapshot(step=0, peers=1, samples=0, target=256, samples_per_second=None, eta_seconds=None)
    assert status_line("digits", unknown, ("started",)) == (
        "digits: step 0, 0/256 samples, 1 peer, unknown samples/s, ETA unknown"
    )


# ---------------------------------------------------------------------------------------- the integrations' view


@dataclass
class State:
    """The fields of ``CollaborationState`` that displays use."""

    optimizer_step: int
    samples_accumulated: int
    num_peers: int = 1
    target_batch_size: int = 128
    state_downloads: int = 0
    failed_rounds: int = 0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_collaboration_progress_smooths_the_rate_and_logs_only_state_changes():
    clock, lines = Clock(), []
    progress = CollaborationProgress("digits", log=lambda level, message: lines.append((level, message)), clock=clock)
    first = progress.update(State(0, 0))
    assert first.samples_per_second is None and first.eta_seconds is None  # nothing measured yet: unknown
    # 256 samples/s: 2 steps of 128 per second, the display refreshed twice a second (at a step boundary each time)
    for i in range(1, 21):
        clock.now = i * 0.5
        shown = progress.update(State(i, 0))
    assert shown.step == 20 and isinstance(shown.step, int)
    assert shown.samples_per_second == pytest.approx(256.0)
    assert shown.eta_seconds == pytest.approx(0.5)
    clock.now += 0.5
    progress.update(State(21, 0, num_peers=2))  # a peer joined
    clock.now += 0.5
    progress.update(State(40, 0, num_peers=2, state_downloads=1))  # downloaded: the step jumped
    after_download = progress.latest
    assert after_download is not None and after_download.samples_per_second is None  # not a speed: restarted
    info = [message for level, message in lines if level == logging.INFO]
    assert info == [
        "digits: step 21, 0/128 samples, 2 peers, 256 samples/s, ETA 0.5s (1 peer joined)",
        "digits: step 40, 0/128 samples, 2 peers, unknown samples/s, ETA unknown "
        "(downloaded the collaboration's state)",
    ]


def test_collaboration_progress_lines_are_not_even_formatted_when_nobody_reads_them(monkeypatch):
    import collab_core.reporting as reporting

    lines = []
    progress = CollaborationProgress("digits", log=lambda level, message: lines.append(level), clock=Clock())
    monkeypatch.setattr(reporting.logger, "isEnabledFor", lambda level: False)
    progress.update(State(0, 0))
    assert lines == []
