"""What a load test checks per connection: each seq once, in order; and percentiles.

A session's messages carry seqs 1, 2, 3, … with no gap, so a connection that joined at
seq S must receive S+1, S+2, … each once and in order. One `SeqTally` per connection
counts what it got: `received` (each seq once; a duplicate is not a delivery),
`duplicates` (a seq not above the highest so far, or, with `remember`, one seen before),
`gaps` (a seq more than one past the highest so far) and, with `remember`, `backwards` (a
seq below the highest that was not seen before). `remember` keeps every seq seen, one
byte each, for a connection that reconnects and has seqs replayed, and for `has(seq)`.

`chat-service loadtest` and the scripts in `bench/` count with this one class, so a
figure from either means the same.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


class SeqTally:
    # Slots: a load test holds one per connection, thousands of them.
    __slots__ = ("backwards", "duplicates", "first_problem", "gaps", "last_seq", "received", "seen")

    def __init__(self, last_seq: int = 0, remember: bool = False) -> None:
        self.last_seq = last_seq  # the highest seq so far (the one joined at, to begin with)
        self.received = 0
        self.duplicates = 0
        self.gaps = 0
        self.backwards = 0
        self.first_problem: str | None = None
        self.seen = bytearray(64) if remember else None

    def has(self, seq: int) -> bool:
        seen = self.seen
        return seen is not None and seq < len(seen) and seen[seq] == 1

    def see(self, seq: int) -> str | None:
        """Count one delivery; what is wrong with it ("duplicate", "out of order", "gap")."""
        last = self.last_seq
        seen = self.seen
        problem = None
        if seq <= last and (seen is None or self.has(seq)):
            self.duplicates += 1
            problem = "duplicate"
        else:
            if seq < last:
                self.backwards += 1
                problem = "out of order"
            elif seq > last + 1:
                self.gaps += 1
                problem = "gap"
            if seen is not None:
                if seq >= len(seen):
                    seen.extend(bytes(max(seq + 1 - len(seen), len(seen))))
                seen[seq] = 1
            self.received += 1
            if seq > last:
                self.last_seq = seq
        if problem is not None and self.first_problem is None:
            self.first_problem = f"expected seq {last + 1}, got {seq}"
        return problem


def percentile(values: Iterable[float], q: float) -> float:
    """Nearest-rank percentile (`q` in 0..1); nan without values."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return float(ordered[max(1, math.ceil(q * len(ordered))) - 1])
