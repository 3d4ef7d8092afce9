"""Formatting figures for a report: markdown tables, ranges over repeats."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def markdown_table(rows: Sequence[dict[str, str]]) -> str:
    if not rows:
        return "(no rows)"
    keys = list(rows[0])
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    out += ["| " + " | ".join(row.get(k, "") for k in keys) + " |" for row in rows]
    return "\n".join(out)


def spread(values: Sequence[float], fmt: str = "{:.0f}") -> str:
    """`min-max` (en dash) of the finite values (one value when they agree when formatted)."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return "-"
    low, high = fmt.format(min(finite)), fmt.format(max(finite))
    return low if low == high else f"{low}\u2013{high}"


def min_median(values: Sequence[float], fmt: str = "{:.0f}") -> str:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return "-"
    return f"{fmt.format(min(finite))} / {fmt.format(statistics.median(finite))}"
