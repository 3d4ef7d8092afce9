"""Message history paging: seq and time cursors, direction, has_more."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import pytest

from chatservice.components import Components
from chatservice.domain import Message, Principal, isoformat
from chatservice.services.errors import InvalidInput
from chatservice.services.messages import MAX_PAGE, Draft
from tests.integration.helpers import as_utc, group, users


@pytest.fixture
async def history(parts: Components) -> tuple[Principal, str, list[Message]]:
    """A session with ten messages, seq 1..10, from two senders."""
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    sent = []
    for i in range(1, 11):
        who = alice if i % 2 else bob
        sent.append((await parts.messages.send(who, sid, Draft(content=f"m{i}"))).message)
    assert [m.seq for m in sent] == list(range(1, 11))
    return bob, sid, sent


def sent_at(history: tuple[Principal, str, list[Message]], index: int) -> datetime:
    """When the message at `index` was stored, as an aware UTC time."""
    moment = as_utc(history[2][index].created_at)
    assert moment is not None
    return moment


async def seqs(
    parts: Components,
    history: tuple[Principal, str, list[Message]],
    *,
    before: str | None = None,
    after: str | None = None,
    limit: int = 50,
) -> tuple[list[int], bool, int]:
    who, sid, _ = history
    page = await parts.messages.page(who, sid, before=before, after=after, limit=limit)
    contents = [m.content for m in page.messages]
    assert contents == [f"m{m.seq}" for m in page.messages]
    return [m.seq for m in page.messages], page.has_more, page.total


async def test_no_cursor_gives_the_newest_messages_in_ascending_order(
    parts: Components, history: tuple[Principal, str, list[Message]]
) -> None:
    assert await seqs(parts, history, limit=3) == ([8, 9, 10], True, 10)
    assert await seqs(parts, history, limit=10) == (list(range(1, 11)), False, 10)
    assert await seqs(parts, history) == (list(range(1, 11)), False, 10)


async def test_an_empty_session_has_an_empty_page(parts: Components) -> None:
    alice = users(1)[0]
    sid = await group(parts, alice)
    page = await parts.messages.page(alice, sid, before=None, after=None, limit=50)
    assert (page.messages, page.has_more, page.total) == ([], False, 0)


async def test_before_a_seq_gives_the_newest_messages_older_than_it(
    parts: Components, history: tuple[Principal, str, list[Message]]
) -> None:
    assert await seqs(parts, history, before="8", limit=3) == ([5, 6, 7], True, 10)
    assert await seqs(parts, history, before="4", limit=3) == ([1, 2, 3], False, 10)
    assert await seqs(parts, history, before="3", limit=3) == ([1, 2], False, 10)
    assert await seqs(parts, history, before="1", limit=3) == ([], False, 10)


async def test_walking_back_with_before_visits_every_message_once(
    parts: Components, history: tuple[Principal, str, list[Message]]
) -> None:
    walked: list[int] = []
    page, has_more, _ = await seqs(parts, history, limit=4)
    walked = page + walked
    while has_more:
        page, has_more, _ = await seqs(parts, history, before=str(page[0]), limit=4)
        walked = page + walked
    assert walked == list(range(1, 11))


async def test_after_a_seq_gives_the_first_messages_newer_than_it(
    parts: Components, history: tuple[Principal, str, list[Message]]
) -> None:
    assert await seqs(parts, history, after="0", limit=3) == ([1, 2, 3], True, 10)
    assert await seqs(parts, history, after="2", limit=3) == ([3, 4, 5], True, 10)
    assert await seqs(parts, history, after="7", limit=3) == ([8, 9, 10], False, 10)
    assert await seqs(parts, history, after="10", limit=3) == ([], False, 10)
    assert await seqs(parts, history, after="99", limit=3) == ([], False, 10)


async def test_before_and_after_together_give_the_window_between(
    parts: Components, history: tuple[Principal, str, list[Message]]
) -> None:
    assert await seqs(parts, history, after="2", before="9") == ([3, 4, 5, 6, 7, 8], False, 10)
    assert await seqs(parts, history, after="2", before="9", limit=3) == ([3, 4, 5], True, 10)
    assert await seqs(parts, history, after="5", before="6") == ([], False, 10)


async def test_time_cursors_with_z_and_with_offset(
    parts: Components, history: tuple[Principal, str, list[Message]]
) -> None:
    fifth = sent_at(history, 4)
    with_z = isoformat(fifth)
    assert with_z is not None and with_z.endswith("Z")
    with_offset = fifth.isoformat()
    assert with_offset.endswith("+00:00")
    for stamp in (with_z, with_offset):
        assert await seqs(parts, history, after=stamp) == ([6, 7, 8, 9, 10], False, 10)
        assert await seqs(parts, history, before=stamp) == ([1, 2, 3, 4], False, 10)
        assert await seqs(parts, history, before=stamp, limit=2) == ([3, 4], True, 10)
        assert await seqs(parts, history, after=stamp, limit=2) == ([6, 7], True, 10)


async def test_time_cursor_in_another_zone_means_the_same_instant(
    parts: Components, history: tuple[Principal, str, list[Message]]
) -> None:
    fifth = sent_at(history, 4)
    seoul = fifth.astimezone(timezone(timedelta(hours=9)))
    stamp = seoul.isoformat()
    assert stamp.endswith("+09:00")
    assert await seqs(parts, history, after=stamp) == ([6, 7, 8, 9, 10], False, 10)


async def test_time_cursor_whose_plus_became_a_space_in_a_query_string(
    parts: Components, history: tuple[Principal, str, list[Message]]
) -> None:
    stamp = sent_at(history, 4).isoformat().replace("+", " ")
    assert await seqs(parts, history, after=stamp) == ([6, 7, 8, 9, 10], False, 10)


async def test_time_cursors_outside_the_history(
    parts: Components, history: tuple[Principal, str, list[Message]]
) -> None:
    first = sent_at(history, 0)
    last = sent_at(history, -1)
    earlier = isoformat(first - timedelta(days=1))
    later = isoformat(last + timedelta(days=1))
    assert await seqs(parts, history, after=earlier, limit=4) == ([1, 2, 3, 4], True, 10)
    assert await seqs(parts, history, before=later, limit=4) == ([7, 8, 9, 10], True, 10)
    assert await seqs(parts, history, before=earlier) == ([], False, 10)
    assert await seqs(parts, history, after=later) == ([], False, 10)


@pytest.mark.parametrize("cursor", ["yesterday", "-1", "1.5", "2024-13-45T00:00:00Z", "seq:3"])
@pytest.mark.parametrize("side", ["before", "after"])
async def test_an_invalid_cursor_is_rejected(
    parts: Components, history: tuple[Principal, str, list[Message]], cursor: str, side: str
) -> None:
    who, sid, _ = history
    bounds: dict[str, str | None] = {"before": None, "after": None, side: cursor}
    with pytest.raises(InvalidInput):
        await parts.messages.page(who, sid, limit=10, **bounds)


async def test_an_empty_cursor_means_no_cursor(
    parts: Components, history: tuple[Principal, str, list[Message]]
) -> None:
    assert await seqs(parts, history, before="", after="", limit=2) == ([9, 10], True, 10)


@pytest.mark.parametrize("limit", [0, -1, MAX_PAGE + 1])
async def test_limit_out_of_bounds_is_rejected(
    parts: Components, history: tuple[Principal, str, list[Message]], limit: int
) -> None:
    who, sid, _ = history
    with pytest.raises(InvalidInput):
        await parts.messages.page(who, sid, before=None, after=None, limit=limit)


async def test_limit_bounds_are_inclusive(
    parts: Components, history: tuple[Principal, str, list[Message]]
) -> None:
    assert MAX_PAGE == 200
    assert await seqs(parts, history, limit=1) == ([10], True, 10)
    assert await seqs(parts, history, limit=MAX_PAGE) == (list(range(1, 11)), False, 10)


async def test_total_counts_the_whole_session_not_the_page(parts: Components) -> None:
    alice = users(1)[0]
    sid = await group(parts, alice)
    other = await group(parts, alice)
    for i in range(3):
        await parts.messages.send(alice, sid, Draft(content=f"m{i}"))
    await parts.messages.send(alice, other, Draft(content="elsewhere"))
    page = await parts.messages.page(alice, sid, before="2", after=None, limit=1)
    assert ([m.seq for m in page.messages], page.total) == ([1], 3)


async def test_total_leaves_out_deleted_messages(parts: Components) -> None:
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    other = await group(parts, alice, bob)
    sent = [
        (await parts.messages.send(alice, sid, Draft(content=f"m{i}"))).message for i in range(1, 6)
    ]
    elsewhere = (await parts.messages.send(alice, other, Draft(content="elsewhere"))).message
    await parts.messages.delete(alice, sent[1].message_id)
    await parts.messages.delete(alice, sent[3].message_id)
    await parts.messages.delete(alice, elsewhere.message_id)
    page = await parts.messages.page(bob, sid, before=None, after=None, limit=50)
    assert ([m.seq for m in page.messages], page.total) == ([1, 3, 5], 3)
    assert (await parts.messages.page(bob, other, before=None, after=None, limit=50)).total == 0
    # A message sent after the deletions counts once more.
    await parts.messages.send(bob, sid, Draft(content="m6"))
    page = await parts.messages.page(bob, sid, before="6", after=None, limit=1)
    assert ([m.seq for m in page.messages], page.total) == ([5], 4)


async def test_time_cursors_page_like_the_stored_times_when_commits_share_a_time(
    parts: Components,
) -> None:
    """Messages committed together share one time; a time cursor must still mean exactly
    "stored after" / "stored before" that time, whichever message it came from."""
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    for burst in range(4):
        await asyncio.gather(
            *(
                parts.messages.send(alice if i % 2 else bob, sid, Draft(content=f"b{burst}.{i}"))
                for i in range(5)
            )
        )
    stored = (await parts.messages.page(alice, sid, before=None, after=None, limit=50)).messages
    assert [m.seq for m in stored] == list(range(1, 21))
    for message in stored:
        moment = as_utc(message.created_at)
        assert moment is not None
        stamp = isoformat(moment)
        later = [m.seq for m in stored if as_utc(m.created_at) > moment]  # type: ignore[operator]
        earlier = [m.seq for m in stored if as_utc(m.created_at) < moment]  # type: ignore[operator]
        after = await parts.messages.page(alice, sid, before=None, after=stamp, limit=50)
        before = await parts.messages.page(alice, sid, before=stamp, after=None, limit=50)
        assert [m.seq for m in after.messages] == later
        assert [m.seq for m in before.messages] == earlier
