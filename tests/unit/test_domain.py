from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatservice.domain import Cursor, isoformat, new_id


def test_ids_are_prefixed_and_lowercase_ulids() -> None:
    value = new_id("msg")
    assert re.fullmatch(r"msg_[0-9a-hjkmnp-tv-z]{26}", value)


def test_ids_sort_by_creation_time() -> None:
    first = new_id("sess")
    time.sleep(0.002)
    second = new_id("sess")
    assert first < second


def test_ids_do_not_repeat() -> None:
    assert len({new_id("msg") for _ in range(10_000)}) == 10_000


@pytest.mark.parametrize(
    ("raw", "seq", "moment"),
    [
        ("42", 42, None),
        ("0", 0, None),
        ("2025-10-29T10:30:00Z", None, datetime(2025, 10, 29, 10, 30, tzinfo=UTC)),
        ("2025-10-29T10:30:00+00:00", None, datetime(2025, 10, 29, 10, 30, tzinfo=UTC)),
        ("2025-10-29T19:30:00+09:00", None, datetime(2025, 10, 29, 10, 30, tzinfo=UTC)),
        ("2025-10-29T10:30:00", None, datetime(2025, 10, 29, 10, 30, tzinfo=UTC)),
    ],
)
def test_cursor_is_a_seq_or_a_time(raw: str, seq: int | None, moment: datetime | None) -> None:
    cursor = Cursor.parse(raw)
    assert cursor.seq == seq
    assert cursor.moment == moment


@pytest.mark.parametrize("raw", ["yesterday", "-1", "12abc", "2025-13-01T00:00:00Z", ""])
def test_cursor_rejects_anything_else(raw: str) -> None:
    with pytest.raises(ValueError):
        Cursor.parse(raw)


@given(st.integers(min_value=0, max_value=2**63 - 1))
def test_any_non_negative_64_bit_integer_is_a_seq_cursor(value: int) -> None:
    # Past the 32-bit seq columns a cursor means "past every message": the largest seq.
    assert Cursor.parse(str(value)).seq == min(value, 2**31 - 1)


def test_a_cursor_past_64_bits_is_refused() -> None:
    with pytest.raises(ValueError):
        Cursor.parse(str(2**63))


def test_isoformat_writes_utc_with_z() -> None:
    seoul = timezone(timedelta(hours=9))
    assert isoformat(datetime(2025, 10, 29, 19, 30, tzinfo=seoul)) == "2025-10-29T10:30:00Z"
    assert isoformat(datetime(2025, 10, 29, 10, 30)) == "2025-10-29T10:30:00Z"
    assert isoformat(None) is None
