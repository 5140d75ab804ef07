"""The state-download watch (pure): progress lines, a donor that stopped, and giving up only on no progress."""

from __future__ import annotations

from collab_core.download_watch import (
    FIRST_REPORT_SECONDS,
    REPORT_EVERY_SECONDS,
    DownloadProgress,
    DownloadWatch,
    megabytes,
    transfer_rate,
)

MB = 1_000_000


def test_a_slow_download_that_keeps_moving_never_stalls_and_is_reported_at_a_human_pace():
    watch = DownloadWatch(stall_timeout=10.0, now=0.0, before=DownloadProgress(attempt=4))
    lines = []
    for second in range(1, 121):  # 100 MB at about 6.7 Mbit/s: two minutes, far beyond the stall timeout
        verdict = watch.observe(float(second), DownloadProgress(5, second * MB * 100 // 120, 100 * MB))
        assert not verdict.stalled
        if verdict.line:
            lines.append((second, verdict.line))
    assert lines[0][0] == FIRST_REPORT_SECONDS
    assert all(b - a >= REPORT_EVERY_SECONDS for (a, _), (b, _) in zip(lines, lines[1:], strict=False))
    assert len(lines) <= 1 + 120 / REPORT_EVERY_SECONDS
    assert lines[-1] == (113, "downloading the state: 94.2 MB of 100.0 MB (6.7 Mbit/s), 113 s")
    assert watch.reported and watch.summary(121.0, 100 * MB) == "downloaded the state: 100.0 MB in 121 s (6.6 Mbit/s)"


def test_no_byte_and_no_new_serving_peer_for_the_stall_timeout_gives_up():
    watch = DownloadWatch(stall_timeout=10.0, now=0.0, before=DownloadProgress())
    assert not watch.observe(1.0, DownloadProgress(1, 5 * MB, 50 * MB)).stalled
    assert not watch.observe(10.5, DownloadProgress(1, 5 * MB, 50 * MB)).stalled  # 9.5 s without a byte
    assert watch.observe(11.0, DownloadProgress(1, 5 * MB, 50 * MB)).stalled


def test_a_serving_peer_that_stops_mid_transfer_is_reported_and_the_next_one_counts_as_progress():
    watch = DownloadWatch(stall_timeout=10.0, now=0.0, before=DownloadProgress(attempt=2, received_bytes=7))
    watch.observe(1.0, DownloadProgress(3, 0, None))  # the first peer of this download: no line, no stall
    watch.observe(5.0, DownloadProgress(3, 40 * MB, 100 * MB))
    verdict = watch.observe(14.0, DownloadProgress(4, 0, None))  # 9 s without a byte, then the next peer
    assert verdict.line == "the peer serving the state stopped after 40.0 MB; downloading it from another peer"
    assert not watch.observe(23.0, DownloadProgress(4, 0, None)).stalled  # the clock restarted at the new peer
    assert watch.observe(24.0, DownloadProgress(4, 0, None)).stalled


def test_the_counters_of_earlier_downloads_are_not_this_ones():
    watch = DownloadWatch(stall_timeout=10.0, now=0.0, before=DownloadProgress(attempt=3, received_bytes=9 * MB))
    # the averager has not started this download yet: the old counters are shown as nothing, not as progress
    verdict = watch.observe(FIRST_REPORT_SECONDS, DownloadProgress(3, 9 * MB, 9 * MB))
    assert verdict.line is None and not verdict.stalled
    assert watch.observe(10.0, DownloadProgress(3, 9 * MB, 9 * MB)).stalled


def test_sizes_and_rates_read_well():
    assert megabytes(123_456_789) == "123.5 MB"
    assert transfer_rate(2_500_000, 1.0) == "20.0 Mbit/s"
    assert transfer_rate(1, 0.0) == "unknown Mbit/s"


def test_the_rate_counts_from_the_first_snapshot_of_a_serving_peer_not_from_bytes_before_it():
    watch = DownloadWatch(stall_timeout=10.0, now=0.0, before=DownloadProgress())
    watch.observe(1.0, DownloadProgress(1, 2 * MB, 50 * MB))  # the transfer began between two polls
    line = watch.observe(FIRST_REPORT_SECONDS, DownloadProgress(1, 4 * MB, 50 * MB)).line
    assert line == "downloading the state: 4.0 MB of 50.0 MB (8.0 Mbit/s), 3 s"  # 2 MB in 2 s, not 4 MB in 3 s
