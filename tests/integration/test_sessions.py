"""Sessions through the service layer: kinds, membership, listing, detail, end, delete."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from chatservice.components import Components
from chatservice.domain import NewSession, Principal, utcnow
from chatservice.services.errors import Forbidden, InvalidInput, NotFound, SessionClosed
from chatservice.services.messages import Draft
from tests.conftest import new_user
from tests.integration.helpers import as_utc, group, send, users

# -- creating ---------------------------------------------------------------------------


async def test_group_creator_is_owner_and_participants_are_members(parts: Components) -> None:
    alice, bob, carol = users(3)
    detail, created = await parts.sessions.create(
        alice,
        NewSession(
            kind="group",
            title="Team",
            metadata={"topic": "launch"},
            participants=[bob.user_id, carol.user_id],
        ),
    )
    assert created is True
    session = detail.session
    assert session.session_id.startswith("sess_")
    assert session.trace_id.startswith("trace_")
    assert (session.kind, session.status, session.title) == ("group", "active", "Team")
    assert session.user_id == alice.user_id
    assert session.metadata == {"topic": "launch"}
    assert session.last_seq == 0
    roles = {p.user_id: p.role for p in detail.participants}
    assert roles == {alice.user_id: "owner", bob.user_id: "member", carol.user_id: "member"}
    assert detail.message_count == 0
    assert detail.agent is None


async def test_participant_list_drops_duplicates_padding_and_the_creator(
    parts: Components,
) -> None:
    alice, bob, carol = users(3)
    detail, _ = await parts.sessions.create(
        alice,
        NewSession(
            kind="group",
            participants=[bob.user_id, f"  {bob.user_id} ", alice.user_id, carol.user_id],
        ),
    )
    ids = [p.user_id for p in detail.participants]
    assert sorted(ids) == sorted([alice.user_id, bob.user_id, carol.user_id])
    assert len(ids) == 3
    owner = [p for p in detail.participants if p.user_id == alice.user_id]
    assert owner[0].role == "owner"


@pytest.mark.parametrize("bad", ["", "   ", "x" * 101])
async def test_malformed_participant_id_is_rejected(parts: Components, bad: str) -> None:
    alice = Principal(new_user())
    with pytest.raises(InvalidInput):
        await parts.sessions.create(alice, NewSession(kind="group", participants=[bad]))
    summaries, total = await parts.sessions.list(
        alice, status=None, agent_id=None, limit=10, offset=0
    )
    assert (summaries, total) == ([], 0)


async def test_creator_name_is_stored_as_display_name(parts: Components) -> None:
    alice = Principal(new_user(), name="Alice A.")
    detail, _ = await parts.sessions.create(alice, NewSession(kind="group"))
    assert detail.participants[0].display_name == "Alice A."


async def test_agent_session_with_the_builtin_demo_agent(parts: Components) -> None:
    alice = Principal(new_user())
    detail, created = await parts.sessions.create(
        alice, NewSession(kind="agent", agent_id=1, title="Ask the demo")
    )
    assert created
    assert (detail.session.kind, detail.session.agent_id) == ("agent", 1)
    assert detail.agent is not None
    assert (detail.agent.id, detail.agent.name, detail.agent.backend) == (1, "Demo", "demo")
    assert [p.user_id for p in detail.participants] == [alice.user_id]


async def test_unknown_agent_is_rejected(parts: Components) -> None:
    alice = Principal(new_user())
    with pytest.raises(InvalidInput) as err:
        await parts.sessions.create(alice, NewSession(kind="agent", agent_id=987654))
    assert err.value.code == "UNKNOWN_AGENT"
    _, total = await parts.sessions.list(alice, status=None, agent_id=None, limit=10, offset=0)
    assert total == 0


@pytest.mark.parametrize(
    ("request_", "why"),
    [
        (NewSession(kind="agent"), "agent without agent_id"),
        (NewSession(kind="group", agent_id=1), "group with agent_id"),
        (NewSession(kind="direct", agent_id=1, participants=["someone"]), "direct with agent"),
        (NewSession(kind="channel"), "unknown kind"),
        (NewSession(kind="group", title="t" * 201), "title too long"),
        (NewSession(kind="group", metadata=["not", "a", "dict"]), "metadata not an object"),  # type: ignore[arg-type]
    ],
)
async def test_invalid_create_requests_are_rejected(
    parts: Components, request_: NewSession, why: str
) -> None:
    alice = Principal(new_user())
    with pytest.raises(InvalidInput):
        await parts.sessions.create(alice, request_)
    _, total = await parts.sessions.list(alice, status=None, agent_id=None, limit=10, offset=0)
    assert total == 0, why


# -- direct sessions ----------------------------------------------------------------------


@pytest.mark.parametrize("others", [0, 2, "self"])
async def test_direct_session_needs_exactly_one_other_user(
    parts: Components, others: int | str
) -> None:
    alice = Principal(new_user())
    if others == "self":
        participants = [alice.user_id]
    else:
        assert isinstance(others, int)
        participants = [new_user() for _ in range(others)]
    with pytest.raises(InvalidInput):
        await parts.sessions.create(alice, NewSession(kind="direct", participants=participants))


async def test_direct_pair_is_returned_again_in_either_order(parts: Components) -> None:
    alice, bob = users(2)
    first, created = await parts.sessions.create(
        alice, NewSession(kind="direct", participants=[bob.user_id])
    )
    assert created
    assert first.session.kind == "direct"
    assert {p.user_id: p.role for p in first.participants} == {
        alice.user_id: "owner",
        bob.user_id: "member",
    }
    again, created_again = await parts.sessions.create(
        alice, NewSession(kind="direct", participants=[bob.user_id])
    )
    reverse, created_reverse = await parts.sessions.create(
        bob, NewSession(kind="direct", participants=[alice.user_id])
    )
    assert (created_again, created_reverse) == (False, False)
    assert again.session.session_id == first.session.session_id
    assert reverse.session.session_id == first.session.session_id
    _, total = await parts.sessions.list(bob, status=None, agent_id=None, limit=10, offset=0)
    assert total == 1


async def test_concurrent_creates_of_one_direct_pair_make_one_session(
    parts: Components,
) -> None:
    alice, bob = users(2)
    requests = [
        parts.sessions.create(alice, NewSession(kind="direct", participants=[bob.user_id]))
        if i % 2
        else parts.sessions.create(bob, NewSession(kind="direct", participants=[alice.user_id]))
        for i in range(12)
    ]
    results = await asyncio.gather(*requests)
    ids = {detail.session.session_id for detail, _ in results}
    assert len(ids) == 1
    assert sum(created for _, created in results) == 1
    for who in (alice, bob):
        summaries, total = await parts.sessions.list(
            who, status=None, agent_id=None, limit=50, offset=0
        )
        assert total == 1
        assert [s.session.session_id for s in summaries] == list(ids)


async def test_direct_pair_can_talk_again_after_their_session_was_deleted(
    parts: Components,
) -> None:
    """A deleted session leaves every list; asking for the pair again must work."""
    alice, bob = users(2)
    first, _ = await parts.sessions.create(
        alice, NewSession(kind="direct", participants=[bob.user_id])
    )
    await parts.sessions.delete(alice, first.session.session_id)
    second, created = await parts.sessions.create(
        bob, NewSession(kind="direct", participants=[alice.user_id])
    )
    assert created is True
    assert second.session.session_id != first.session.session_id
    assert second.session.status == "active"


async def test_an_ended_direct_session_is_not_reused_for_the_pair(parts: Components) -> None:
    """Ending makes a session read-only; the pair's next conversation is a new session."""
    alice, bob = users(2)
    first, _ = await parts.sessions.create(
        alice, NewSession(kind="direct", participants=[bob.user_id])
    )
    await parts.sessions.end(alice, first.session.session_id)
    second, created = await parts.sessions.create(
        alice, NewSession(kind="direct", participants=[bob.user_id])
    )
    assert created is True
    assert second.session.session_id != first.session.session_id
    again, created_again = await parts.sessions.create(
        bob, NewSession(kind="direct", participants=[alice.user_id])
    )
    assert created_again is False
    assert again.session.session_id == second.session.session_id


# -- scheduled sessions -------------------------------------------------------------------


async def test_future_scheduled_at_makes_a_scheduled_session_until_the_first_message(
    parts: Components,
) -> None:
    alice, bob = users(2)
    when = utcnow() + timedelta(hours=2)
    detail, _ = await parts.sessions.create(
        alice, NewSession(kind="group", participants=[bob.user_id], scheduled_at=when)
    )
    sid = detail.session.session_id
    assert detail.session.status == "scheduled"
    assert detail.session.started_at is None
    assert as_utc(detail.session.scheduled_at) == when

    scheduled, _ = await parts.sessions.list(
        alice, status="scheduled", agent_id=None, limit=10, offset=0
    )
    assert [s.session.session_id for s in scheduled] == [sid]

    before_send = utcnow()
    await send(parts, bob, sid, "we start early")
    after = await parts.sessions.detail(alice, sid)
    assert after.session.status == "active"
    started = as_utc(after.session.started_at)
    assert started is not None and before_send <= started <= utcnow()
    assert as_utc(after.session.scheduled_at) == when

    await send(parts, alice, sid, "second")
    again = await parts.sessions.detail(alice, sid)
    assert as_utc(again.session.started_at) == started  # the first message set it, once


async def test_past_scheduled_at_creates_an_active_session(parts: Components) -> None:
    alice = Principal(new_user())
    detail, _ = await parts.sessions.create(
        alice, NewSession(kind="group", scheduled_at=utcnow() - timedelta(minutes=5))
    )
    assert detail.session.status == "active"


# -- listing ------------------------------------------------------------------------------


async def test_list_shows_only_the_callers_sessions(parts: Components) -> None:
    alice, bob, carol = users(3)
    shared = await group(parts, alice, bob)
    alone = await group(parts, alice)
    bobs = await group(parts, bob)

    def ids(summaries: list) -> set[str]:  # type: ignore[type-arg]
        return {s.session.session_id for s in summaries}

    a, a_total = await parts.sessions.list(alice, status=None, agent_id=None, limit=50, offset=0)
    b, b_total = await parts.sessions.list(bob, status=None, agent_id=None, limit=50, offset=0)
    c, c_total = await parts.sessions.list(carol, status=None, agent_id=None, limit=50, offset=0)
    assert (ids(a), a_total) == ({shared, alone}, 2)
    assert (ids(b), b_total) == ({shared, bobs}, 2)
    assert (ids(c), c_total) == (set(), 0)


async def test_list_pages_with_limit_offset_and_total(parts: Components) -> None:
    alice = Principal(new_user())
    created = [await group(parts, alice, title=f"s{i}") for i in range(5)]
    seen: list[str] = []
    for offset in (0, 2, 4):
        page, total = await parts.sessions.list(
            alice, status=None, agent_id=None, limit=2, offset=offset
        )
        assert total == 5
        has_more = offset + len(page) < total
        assert has_more == (offset < 4)
        seen += [s.session.session_id for s in page]
    assert sorted(seen) == sorted(created)
    assert len(seen) == 5
    # Newest activity first: nothing was sent, so the newest created comes first.
    assert seen == list(reversed(created))
    beyond, total = await parts.sessions.list(alice, status=None, agent_id=None, limit=2, offset=10)
    assert (beyond, total) == ([], 5)


async def test_list_puts_the_session_with_the_latest_message_first(parts: Components) -> None:
    alice = Principal(new_user())
    older = await group(parts, alice)
    newer = await group(parts, alice)
    await send(parts, alice, older, "bump")
    page, _ = await parts.sessions.list(alice, status=None, agent_id=None, limit=10, offset=0)
    assert [s.session.session_id for s in page] == [older, newer]


async def test_list_filters_by_status(parts: Components) -> None:
    alice = Principal(new_user())
    active = await group(parts, alice)
    ended = await group(parts, alice)
    await parts.sessions.end(alice, ended)
    deleted = await group(parts, alice)
    await parts.sessions.delete(alice, deleted)

    async def listed(status: str | None) -> tuple[set[str], int]:
        page, total = await parts.sessions.list(
            alice, status=status, agent_id=None, limit=50, offset=0
        )
        return {s.session.session_id for s in page}, total

    assert await listed(None) == ({active, ended}, 2)
    assert await listed("active") == ({active}, 1)
    assert await listed("archived") == ({ended}, 1)
    assert await listed("scheduled") == (set(), 0)
    for bad in ("deleted", "bogus"):
        with pytest.raises(InvalidInput):
            await parts.sessions.list(alice, status=bad, agent_id=None, limit=50, offset=0)


async def test_list_filters_by_agent_and_names_the_agent(parts: Components) -> None:
    alice = Principal(new_user())
    agent_detail, _ = await parts.sessions.create(alice, NewSession(kind="agent", agent_id=1))
    await group(parts, alice)
    page, total = await parts.sessions.list(alice, status=None, agent_id=1, limit=10, offset=0)
    assert total == 1
    assert [s.session.session_id for s in page] == [agent_detail.session.session_id]
    assert page[0].agent_name == "Demo"
    none, total_none = await parts.sessions.list(
        alice, status=None, agent_id=424242, limit=10, offset=0
    )
    assert (none, total_none) == ([], 0)


async def test_list_carries_last_message_and_its_time(parts: Components) -> None:
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    empty, _ = await parts.sessions.list(alice, status=None, agent_id=None, limit=10, offset=0)
    assert (empty[0].last_message, empty[0].last_message_at) == (None, None)

    await send(parts, alice, sid, "first")
    last = await parts.messages.send(bob, sid, Draft(content="the latest one"))
    page, _ = await parts.sessions.list(alice, status=None, agent_id=None, limit=10, offset=0)
    assert page[0].last_message == "the latest one"
    assert as_utc(page[0].last_message_at) == as_utc(last.message.created_at)
    assert page[0].session.last_seq == 2


async def test_unread_count_excludes_own_messages_and_follows_mark_read(
    parts: Components,
) -> None:
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    for i in range(3):
        await send(parts, alice, sid, f"from alice {i}")
    for i in range(2):
        await send(parts, bob, sid, f"from bob {i}")  # seqs 4, 5

    async def unread(who: Principal) -> int:
        page, _ = await parts.sessions.list(who, status=None, agent_id=None, limit=10, offset=0)
        (summary,) = [s for s in page if s.session.session_id == sid]
        return summary.unread_count

    assert await unread(bob) == 3
    assert await unread(alice) == 2
    await parts.sessions.mark_read(bob, sid, 2)
    assert await unread(bob) == 1
    await parts.sessions.mark_read(bob, sid, 5)
    assert await unread(bob) == 0
    assert await unread(alice) == 2  # bob's watermark is his alone
    await send(parts, alice, sid, "one more")
    assert await unread(bob) == 1


# -- detail -------------------------------------------------------------------------------


async def test_detail_has_participants_message_count_and_last_activity(
    parts: Components,
) -> None:
    alice, bob = users(2)
    detail, _ = await parts.sessions.create(
        alice, NewSession(kind="group", title="Detail", participants=[bob.user_id])
    )
    sid = detail.session.session_id
    assert as_utc(detail.last_activity) == as_utc(detail.session.updated_at)

    await send(parts, alice, sid, "hello")
    last = await parts.messages.send(bob, sid, Draft(content="hi"))
    seen = await parts.sessions.detail(bob, sid)
    assert seen.session.session_id == sid
    assert seen.session.title == "Detail"
    assert seen.session.last_seq == 2
    assert seen.message_count == 2
    assert as_utc(seen.last_activity) == as_utc(last.message.created_at)
    assert {p.user_id: p.role for p in seen.participants} == {
        alice.user_id: "owner",
        bob.user_id: "member",
    }

    # A deleted message leaves the count, and the newest one left is the last activity.
    await parts.messages.delete(bob, last.message.message_id)
    seen = await parts.sessions.detail(alice, sid)
    assert seen.message_count == 1
    assert seen.session.last_seq == 2
    first = (await parts.messages.page(alice, sid, before=None, after=None, limit=1)).messages
    assert as_utc(seen.last_activity) == as_utc(first[0].created_at)


# -- delete -------------------------------------------------------------------------------


async def test_only_the_owner_can_delete(parts: Components) -> None:
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    with pytest.raises(Forbidden):
        await parts.sessions.delete(bob, sid)
    still = await parts.sessions.detail(bob, sid)
    assert still.session.status == "active"


async def test_deleted_session_answers_not_found_and_leaves_every_list(
    parts: Components,
) -> None:
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    await send(parts, bob, sid, "soon gone")
    await parts.sessions.delete(alice, sid)
    for who in (alice, bob):
        with pytest.raises(NotFound):
            await parts.sessions.detail(who, sid)
        with pytest.raises(NotFound):
            await parts.messages.page(who, sid, before=None, after=None, limit=10)
        with pytest.raises(NotFound):
            await parts.messages.send(who, sid, Draft(content="anyone?"))
        with pytest.raises(NotFound):
            await parts.sessions.mark_read(who, sid, 1)
        with pytest.raises(NotFound):
            await parts.sessions.end(who, sid)
        for status in (None, "active", "archived", "scheduled"):
            page, total = await parts.sessions.list(
                who, status=status, agent_id=None, limit=50, offset=0
            )
            assert sid not in {s.session.session_id for s in page}
            assert total == 0
    with pytest.raises(NotFound):
        await parts.sessions.delete(alice, sid)


async def test_an_ended_session_can_still_be_deleted(parts: Components) -> None:
    alice = Principal(new_user())
    sid = await group(parts, alice)
    await parts.sessions.end(alice, sid)
    await parts.sessions.delete(alice, sid)
    with pytest.raises(NotFound):
        await parts.sessions.detail(alice, sid)


# -- end ----------------------------------------------------------------------------------


async def test_end_archives_once_and_makes_the_session_read_only(parts: Components) -> None:
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    await send(parts, bob, sid, "before the end")
    before = utcnow()
    ended = await parts.sessions.end(alice, sid)
    assert ended.status == "archived"
    ended_at = as_utc(ended.ended_at)
    assert ended_at is not None and before <= ended_at <= utcnow()

    again = await parts.sessions.end(alice, sid)
    assert again.status == "archived"
    assert as_utc(again.ended_at) == ended_at

    for who in (alice, bob):
        with pytest.raises(SessionClosed):
            await parts.messages.send(who, sid, Draft(content="after the end"))
    page = await parts.messages.page(bob, sid, before=None, after=None, limit=10)
    assert [m.content for m in page.messages] == ["before the end"]
    detail = await parts.sessions.detail(bob, sid)
    assert detail.session.status == "archived"
    assert detail.session.last_seq == 1
    archived, total = await parts.sessions.list(
        bob, status="archived", agent_id=None, limit=10, offset=0
    )
    assert ([s.session.session_id for s in archived], total) == ([sid], 1)
    _, active_total = await parts.sessions.list(
        bob, status="active", agent_id=None, limit=10, offset=0
    )
    assert active_total == 0


async def test_a_group_member_cannot_end_the_group(parts: Components) -> None:
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    with pytest.raises(Forbidden):
        await parts.sessions.end(bob, sid)
    assert (await parts.sessions.detail(alice, sid)).session.status == "active"


async def test_either_side_of_a_direct_session_can_end_it(parts: Components) -> None:
    alice, bob = users(2)
    detail, _ = await parts.sessions.create(
        alice, NewSession(kind="direct", participants=[bob.user_id])
    )
    ended = await parts.sessions.end(bob, detail.session.session_id)
    assert ended.status == "archived"
    assert ended.ended_at is not None


async def test_concurrent_ends_archive_once(parts: Components) -> None:
    alice = Principal(new_user())
    sid = await group(parts, alice)
    results = await asyncio.gather(*(parts.sessions.end(alice, sid) for _ in range(8)))
    assert {r.status for r in results} == {"archived"}
    assert len({as_utc(r.ended_at) for r in results}) == 1
