"""The per-connection seq check `chat-service loadtest` and bench/ count with."""

from __future__ import annotations

import math

from chatservice.tally import SeqTally, percentile


def test_in_order_deliveries_from_the_joining_seq_are_clean() -> None:
    tally = SeqTally(last_seq=5)
    assert [tally.see(seq) for seq in (6, 7, 8)] == [None, None, None]
    assert (tally.received, tally.duplicates, tally.gaps, tally.last_seq) == (3, 0, 0, 8)
    assert tally.first_problem is None


def test_a_duplicate_is_not_a_delivery_and_a_gap_is_counted() -> None:
    tally = SeqTally()
    assert [tally.see(seq) for seq in (1, 2, 2, 4, 3)] == [
        None,
        None,
        "duplicate",
        "gap",
        "duplicate",  # below the highest and not remembered: taken for a replay
    ]
    assert (tally.received, tally.duplicates, tally.gaps) == (3, 2, 1)
    assert tally.first_problem == "expected seq 3, got 2"


def test_remembering_tells_a_late_seq_from_a_replayed_one() -> None:
    tally = SeqTally(remember=True)
    assert [tally.see(seq) for seq in (1, 3, 2, 2, 200)] == [
        None,
        "gap",
        "out of order",
        "duplicate",
        "gap",
    ]
    assert (tally.received, tally.backwards, tally.duplicates) == (4, 1, 1)
    assert tally.has(2) and tally.has(200) and not tally.has(4) and not tally.has(10_000)


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0  # not the maximum
    assert percentile(values, 1.0) == 100.0
    assert percentile([7.0], 0.0) == 7.0
    assert math.isnan(percentile([], 0.5))
