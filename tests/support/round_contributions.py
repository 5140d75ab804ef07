"""Which recorded micro-batches each collaborative step averaged: the input of the single-process replays.

Every peer script records its micro-batches labelled with the collaborative step they were computed at and, for each
step it took itself, ``CollaborationState.last_round_contributions`` (samples per peer, as gathered by the round).

A peer's contribution to a round is a *prefix* of its micro-batches of that step: it accumulates them in order, and a
round sends everything accumulated so far. Usually that is all of them. The exception is a peer whose round failed
on its own side (e.g. it lost a groupmate's reply) after the others had applied it: that peer goes on accumulating at
the same step until it notices that the others moved on, then downloads their state. The micro-batches it computed in
between were in no round; labelling alone cannot tell them apart, the gathered sample count can.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

Item = TypeVar("Item")


def round_contributions(results: Iterable[dict], step: int) -> dict[str, int]:
    """``{peer id: samples}`` averaged in ``step``, as recorded by the peers that took it (they must agree)."""
    records = [r["contributions"][step] for r in results if step in r["contributions"]]
    assert records, f"no peer recorded taking step {step}"
    assert all(record == records[0] for record in records), f"the peers of step {step} disagree: {records}"
    return records[0]


def sent_in_round(items: Sequence[Item], samples: int, size: Callable[[Item], int], *, took_step: bool) -> list[Item]:
    """The first ``items`` (one peer's micro-batches of one step, in order) whose sizes add up to ``samples``.

    ``took_step``: the peer applied this step itself, so every one of its micro-batches of the step must have been
    sent. Fails (the round averaged samples that were never recorded, or lost some) when no prefix matches.
    """
    sent, total = [], 0
    for item in items:
        if total >= samples:
            break
        sent.append(item)
        total += size(item)
    assert total == samples, f"the round counted {samples} samples of this peer; its micro-batches give {total}"
    if took_step:
        assert len(sent) == len(items), f"a peer that took the step sent {len(sent)} of its {len(items)} micro-batches"
    return sent


def contributed_batches(results: dict[str, dict], step: int, key: str) -> dict[str, list[tuple]]:
    """``{peer name: [(x, y), ...]}``: the recorded ``(step, x, y)`` micro-batches in ``results[name][key]`` that
    collaborative step ``step`` averaged."""
    contributions = round_contributions(results.values(), step)
    found = {}
    for name, result in results.items():
        if result["peer_id"] not in contributions:
            continue
        items = [(x, y) for (k, x, y) in result[key] if k == step]
        took_step = step in result["contributions"]
        found[name] = sent_in_round(items, contributions[result["peer_id"]], lambda b: len(b[0]), took_step=took_step)
    return found
