"""The console readers of the example tests flag what issue 16 found in the console of a fresh clone."""

from __future__ import annotations

from tests.support.console_output import absurd_etas, bar_frames, join_hints, most_lines_in_one_second

BEFORE_LIGHTNING = "\n".join(
    [
        "Dec 03 08:00:00.001 [INFO] [collab_core.progress] digits: step 0, 0/256 samples from 1 peer(s), "
        "ETA 12800000000000000000000.00s",
        'COLLAB_RUN_ID=digits COLLAB_INITIAL_PEERS="/ip4/127.0.0.1/tcp/1/p2p/12D3KooW"',
    ]
    + [f"Dec 03 08:00:01.{i:03d} [INFO] [collab_core.optimizer] digits: averaged step {i}" for i in range(40)]
)
BEFORE_ACCELERATE = (
    "\rcollaborative step 1.0:   0%|          | 0/128 samples [00:00, eta=0.3s, peers=1, samples_per_s=460.0]\n"
    "step 1: loss 2.311\n"
    "\rcollaborative step 2.0:   0%|          | 0/128 samples [00:00, eta=0.1s, peers=1, samples_per_s=1119.5]\n"
)
AFTER_ACCELERATE = (
    "\rcollaborative step 1:  25%|██▌       | 32/128 samples [00:00, 1 peer, unknown samples/s, ETA unknown]"
    "\rcollaborative step 5: 100%|██████████| 128/128 samples [00:01, 1 peer, 460 samples/s, ETA 0.0s]\n"
)


def test_the_old_lightning_console_is_flagged():
    assert absurd_etas(BEFORE_LIGHTNING) == [1.28e22]
    assert most_lines_in_one_second(BEFORE_LIGHTNING) == 40
    assert join_hints(BEFORE_LIGHTNING) == 1


def test_the_old_accelerate_bar_is_flagged_and_the_new_one_reads():
    old = bar_frames(BEFORE_ACCELERATE)
    assert [frame.step for frame in old] == ["1.0", "2.0"] and not any(f.n == f.total for f in old)
    new = bar_frames(AFTER_ACCELERATE)
    assert [(frame.step, frame.n, frame.total, frame.elapsed_seconds) for frame in new] == [
        ("1", 32, 128, 0),
        ("5", 128, 128, 1),
    ]
    assert absurd_etas(AFTER_ACCELERATE) == []


def test_lightning_bar_values_are_read_from_tqdm_and_rich_bars():
    from tests.support.console_output import bar_metric, etas

    rich = "collab/peers:    \n      2.000   \n  collab/eta_secon…\n   1.538  \n"
    tqdm = "3/45 [00:01, collab/step=1.000, collab/peers=2.000, collab/eta_seconds=nan]"
    assert bar_metric(rich, "collab/peers") == [2.0] and bar_metric(tqdm, "collab/peers") == [2.0]
    assert etas(rich) == [1.538]
    assert len(etas(tqdm)) == 1 and etas(tqdm)[0] != etas(tqdm)[0]  # NaN: unknown


def test_a_redraw_after_a_line_logged_above_the_bar_is_told_apart_from_a_refresh():
    console = (
        "hint\n"
        "\rcollaborative step 1:   0%|          | 0/128 samples [00:00]"
        "\rcollaborative step 1:  25%|██▌       | 32/128 samples [00:00, 2 peers, unknown samples/s, ETA unknown]"
        "\r          \rDec 04 08:00:00.001 [INFO] [collab_core.optimizer] downloaded the state\n"
        "\rcollaborative step 6: 100%|██████████| 128/128 samples [00:00, 2 peers, unknown samples/s, ETA 0.0s]"
        "\rcollaborative step 7:   0%|          | 0/128 samples [00:01, 2 peers, 100 samples/s, ETA 1.3s]\n"
    )
    assert [(frame.step, frame.after_write) for frame in bar_frames(console)] == [
        ("1", False),
        ("1", False),
        ("6", True),
        ("7", False),
    ]
