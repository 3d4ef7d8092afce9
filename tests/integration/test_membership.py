"""Group membership: the owner adds and removes, members leave, fixed kinds refuse."""

from __future__ import annotations

import pytest

from chatservice.components import Components
from chatservice.domain import NewSession, Principal
from chatservice.services.errors import Conflict, Forbidden, InvalidInput, NotFound
from tests.conftest import new_user


async def group(parts: Components, owner: Principal, *members: str) -> str:
    detail, _ = await parts.sessions.create(
        owner, NewSession(kind="group", participants=list(members))
    )
    return detail.session.session_id


async def test_the_owner_adds_members_who_then_see_the_session(parts: Components) -> None:
    owner, bob, carol = Principal(new_user()), new_user(), new_user()
    sid = await group(parts, owner, bob)
    added, detail = await parts.sessions.add_participants(owner, sid, [bob, carol, carol])
    assert added == [carol]
    assert {p.user_id for p in detail.participants} == {owner.user_id, bob, carol}
    listed, total = await parts.sessions.list(
        Principal(carol), status=None, agent_id=None, limit=10, offset=0
    )
    assert total == 1 and listed[0].session.session_id == sid


async def test_members_cannot_add_or_remove_others(parts: Components) -> None:
    owner, bob, carol = Principal(new_user()), new_user(), new_user()
    sid = await group(parts, owner, bob, carol)
    with pytest.raises(Forbidden):
        await parts.sessions.add_participants(Principal(bob), sid, [new_user()])
    with pytest.raises(Forbidden):
        await parts.sessions.remove_participant(Principal(bob), sid, carol)


async def test_removed_members_lose_access(parts: Components) -> None:
    owner, bob = Principal(new_user()), new_user()
    sid = await group(parts, owner, bob)
    await parts.sessions.remove_participant(owner, sid, bob)
    with pytest.raises(Forbidden):
        await parts.sessions.detail(Principal(bob), sid)
    with pytest.raises(NotFound):
        await parts.sessions.remove_participant(owner, sid, bob)


async def test_a_member_may_leave_but_the_owner_may_not(parts: Components) -> None:
    owner, bob = Principal(new_user()), Principal(new_user())
    sid = await group(parts, owner, bob.user_id)
    await parts.sessions.remove_participant(bob, sid, bob.user_id)
    with pytest.raises(Forbidden):
        await parts.sessions.detail(bob, sid)
    with pytest.raises(Conflict) as raised:
        await parts.sessions.remove_participant(owner, sid, owner.user_id)
    assert raised.value.code == "OWNER_CANNOT_LEAVE"


async def test_direct_membership_is_fixed(parts: Components) -> None:
    alice, bob = Principal(new_user()), new_user()
    detail, _ = await parts.sessions.create(alice, NewSession(kind="direct", participants=[bob]))
    sid = detail.session.session_id
    with pytest.raises(Conflict) as raised:
        await parts.sessions.add_participants(alice, sid, [new_user()])
    assert raised.value.code == "FIXED_MEMBERSHIP"
    with pytest.raises(Conflict):
        await parts.sessions.remove_participant(alice, sid, bob)


async def test_adding_nobody_is_invalid(parts: Components) -> None:
    owner = Principal(new_user())
    sid = await group(parts, owner)
    with pytest.raises(InvalidInput):
        await parts.sessions.add_participants(owner, sid, [owner.user_id])
