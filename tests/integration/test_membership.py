"""Group membership: the owner adds and removes members, members leave; access follows."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from chatservice import events
from chatservice.components import Components
from chatservice.domain import NewSession
from chatservice.realtime.codec import NATIVE, CloseReason
from chatservice.realtime.connection import Subscription
from chatservice.services.errors import Conflict, Forbidden, InvalidInput, NotFound
from chatservice.services.messages import Draft
from tests.integration.helpers import (
    BusTap,
    FakeSocket,
    attach,
    detach,
    eventually,
    group,
    send,
    users,
)

CLOSE_FORBIDDEN = NATIVE.close_code(CloseReason.FORBIDDEN)
CLOSE_NOT_FOUND = NATIVE.close_code(CloseReason.NOT_FOUND)


async def member_ids(parts: Components, who: object, sid: str) -> set[str]:
    detail = await parts.sessions.detail(who, sid)  # type: ignore[arg-type]
    return {p.user_id for p in detail.participants}


async def test_the_owner_adds_members_who_then_take_part(parts: Components) -> None:
    alice, bob, carol = users(3)
    sid = await group(parts, alice)
    tap = BusTap()
    await parts.bus.subscribe([events.session_channel(sid)], tap)
    try:
        added, detail = await parts.sessions.add_participants(
            alice, sid, [bob.user_id, carol.user_id, bob.user_id, alice.user_id]
        )
    finally:
        await parts.bus.unsubscribe([events.session_channel(sid)], tap)
    assert sorted(added) == sorted([bob.user_id, carol.user_id])
    assert {p.user_id: p.role for p in detail.participants} == {
        alice.user_id: "owner",
        bob.user_id: "member",
        carol.user_id: "member",
    }
    announced = [(e["event"], e["user_id"], e["by"]) for e in tap.of_type("system")]
    assert sorted(announced) == sorted(
        [
            ("participant_added", bob.user_id, alice.user_id),
            ("participant_added", carol.user_id, alice.user_id),
        ]
    )
    assert await send(parts, bob, sid, "hi, I'm new") == 1
    page, total = await parts.sessions.list(carol, status=None, agent_id=None, limit=5, offset=0)
    assert (total, page[0].session.session_id, page[0].unread_count) == (1, sid, 1)


async def test_adding_someone_already_there_adds_nobody(parts: Components) -> None:
    alice, bob, carol = users(3)
    sid = await group(parts, alice, bob)
    added, detail = await parts.sessions.add_participants(alice, sid, [bob.user_id])
    assert added == []
    assert len(detail.participants) == 2
    added, detail = await parts.sessions.add_participants(
        alice, sid, [bob.user_id, carol.user_id, carol.user_id]
    )
    assert added == [carol.user_id]
    assert len(detail.participants) == 3


async def test_adding_nobody_is_rejected(parts: Components) -> None:
    alice = users(1)[0]
    sid = await group(parts, alice)
    for user_ids in ([], [alice.user_id]):
        with pytest.raises(InvalidInput):
            await parts.sessions.add_participants(alice, sid, user_ids)


async def test_only_the_owner_changes_members(parts: Components) -> None:
    alice, bob, carol, dave = users(4)
    sid = await group(parts, alice, bob, carol)
    with pytest.raises(Forbidden):
        await parts.sessions.add_participants(bob, sid, [dave.user_id])
    with pytest.raises(Forbidden):
        await parts.sessions.remove_participant(bob, sid, carol.user_id)
    with pytest.raises(Forbidden):
        await parts.sessions.add_participants(dave, sid, [dave.user_id])
    assert await member_ids(parts, alice, sid) == {alice.user_id, bob.user_id, carol.user_id}


@pytest.mark.parametrize("kind", ["direct", "agent"])
async def test_membership_of_direct_and_agent_sessions_is_fixed(
    parts: Components, kind: str
) -> None:
    alice, bob, carol = users(3)
    request = (
        NewSession(kind="direct", participants=[bob.user_id])
        if kind == "direct"
        else NewSession(kind="agent", agent_id=1, participants=[bob.user_id])
    )
    detail, _ = await parts.sessions.create(alice, request)
    sid = detail.session.session_id
    with pytest.raises(Conflict) as err:
        await parts.sessions.add_participants(alice, sid, [carol.user_id])
    assert err.value.code == "FIXED_MEMBERSHIP"
    with pytest.raises(Conflict):
        await parts.sessions.remove_participant(alice, sid, bob.user_id)
    with pytest.raises(Conflict):
        await parts.sessions.remove_participant(bob, sid, bob.user_id)
    assert await member_ids(parts, alice, sid) == {alice.user_id, bob.user_id}


async def test_a_removed_member_loses_access(parts: Components) -> None:
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    await send(parts, bob, sid, "before removal")
    await parts.sessions.remove_participant(alice, sid, bob.user_id)
    with pytest.raises(Forbidden):
        await parts.sessions.detail(bob, sid)
    with pytest.raises(Forbidden):
        await parts.messages.send(bob, sid, Draft(content="still here?"))
    _, total = await parts.sessions.list(bob, status=None, agent_id=None, limit=5, offset=0)
    assert total == 0
    assert await member_ids(parts, alice, sid) == {alice.user_id}
    with pytest.raises(NotFound):
        await parts.sessions.remove_participant(alice, sid, bob.user_id)
    # Their history stays.
    page = await parts.messages.page(alice, sid, before=None, after=None, limit=5)
    assert [(m.sender_id, m.content) for m in page.messages] == [(bob.user_id, "before removal")]


async def test_a_member_can_leave_but_the_owner_cannot(parts: Components) -> None:
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    with pytest.raises(Conflict) as err:
        await parts.sessions.remove_participant(alice, sid, alice.user_id)
    assert err.value.code == "OWNER_CANNOT_LEAVE"
    await parts.sessions.remove_participant(bob, sid, bob.user_id)
    assert await member_ids(parts, alice, sid) == {alice.user_id}
    with pytest.raises(Forbidden):
        await parts.sessions.detail(bob, sid)


async def test_removing_a_non_member_is_not_found(parts: Components) -> None:
    alice, stranger = users(2)
    sid = await group(parts, alice)
    with pytest.raises(NotFound) as err:
        await parts.sessions.remove_participant(alice, sid, stranger.user_id)
    assert err.value.code == "PARTICIPANT_NOT_FOUND"


async def test_concurrent_adds_of_the_same_user_add_them_once(parts: Components) -> None:
    """Two owners' devices (or a retried request) adding the same person at once."""
    alice = users(1)[0]
    sid = await group(parts, alice)
    newcomers = users(5, "newcomer")
    for newcomer in newcomers:  # several rounds: the race is a matter of timing
        results = await asyncio.gather(
            *(parts.sessions.add_participants(alice, sid, [newcomer.user_id]) for _ in range(12)),
            return_exceptions=True,
        )
        errors = [repr(r)[:120] for r in results if isinstance(r, BaseException)]
        assert errors == [], f"{len(errors)} of 12 concurrent adds failed"
        added = [uid for r in results if not isinstance(r, BaseException) for uid in r[0]]
        assert added == [newcomer.user_id]
    assert await member_ids(parts, alice, sid) == {alice.user_id} | {n.user_id for n in newcomers}


# -- live connections follow membership ---------------------------------------------------


@pytest.fixture
async def attached(parts: Components) -> AsyncIterator[list[Subscription]]:
    opened: list[Subscription] = []
    yield opened
    for conn in opened:
        await detach(parts.hub, conn)


async def test_removal_closes_the_members_connections_after_telling_them(
    parts: Components, attached: list[Subscription]
) -> None:
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    sockets: dict[str, FakeSocket] = {}
    for who in (alice, bob):
        socket = FakeSocket()
        conn = await attach(parts.hub, sid, who.user_id, socket)
        attached.append(conn)
        await conn.go_live()
        sockets[who.user_id] = socket
    await parts.sessions.remove_participant(alice, sid, bob.user_id)
    bob_socket, alice_socket = sockets[bob.user_id], sockets[alice.user_id]
    await eventually(lambda: bob_socket.closed is not None, "bob's connection closes")
    assert bob_socket.closed is not None and bob_socket.closed[0] == CLOSE_FORBIDDEN
    assert bob_socket.system("participant_removed") == [bob.user_id]
    await send(parts, alice, sid, "bob is gone")
    await eventually(lambda: alice_socket.seqs() == [1], "alice still live")
    assert alice_socket.closed is None
    assert alice_socket.system("participant_removed") == [bob.user_id]


async def test_deleting_closes_every_connection_after_telling_them(
    parts: Components, attached: list[Subscription]
) -> None:
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    sockets = []
    for who in (alice, bob):
        socket = FakeSocket()
        conn = await attach(parts.hub, sid, who.user_id, socket)
        attached.append(conn)
        await conn.go_live()
        sockets.append(socket)
    await parts.sessions.delete(alice, sid)
    for socket in sockets:
        await eventually(lambda s=socket: s.closed is not None, "closed")
        assert socket.closed is not None and socket.closed[0] == CLOSE_NOT_FOUND
        assert socket.system("session_deleted") == [alice.user_id]
