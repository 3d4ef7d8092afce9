"""Participants only: every service call that names a session checks membership first."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from chatservice.components import Components
from chatservice.domain import Principal, new_id
from chatservice.services.errors import Forbidden, NotFound
from chatservice.services.messages import Draft
from tests.integration.helpers import group, send, users

Call = Callable[[Components, Principal, str], Awaitable[Any]]

CALLS: dict[str, Call] = {
    "detail": lambda parts, who, sid: parts.sessions.detail(who, sid),
    "messages": lambda parts, who, sid: parts.messages.page(
        who, sid, before=None, after=None, limit=10
    ),
    "send": lambda parts, who, sid: parts.messages.send(who, sid, Draft(content="let me in")),
    "mark_read": lambda parts, who, sid: parts.sessions.mark_read(who, sid, 1),
    "end": lambda parts, who, sid: parts.sessions.end(who, sid),
    "delete": lambda parts, who, sid: parts.sessions.delete(who, sid),
}


@pytest.mark.parametrize("operation", list(CALLS))
async def test_a_non_participant_is_forbidden(parts: Components, operation: str) -> None:
    alice, bob, mallory = users(3)
    sid = await group(parts, alice, bob)
    await send(parts, alice, sid, "private")
    with pytest.raises(Forbidden) as err:
        await CALLS[operation](parts, mallory, sid)
    assert err.value.status == 403
    # ... and the attempt changed nothing.
    detail = await parts.sessions.detail(alice, sid)
    assert detail.session.status == "active"
    assert detail.message_count == 1
    assert [p.user_id for p in detail.participants if p.user_id == mallory.user_id] == []
    assert all(p.last_read_seq == 0 for p in detail.participants)


@pytest.mark.parametrize("operation", list(CALLS))
async def test_an_unknown_session_is_not_found(parts: Components, operation: str) -> None:
    (alice,) = users(1)
    with pytest.raises(NotFound) as err:
        await CALLS[operation](parts, alice, new_id("sess"))
    assert err.value.status == 404


async def test_a_non_participant_sees_nothing_in_the_session_list(parts: Components) -> None:
    alice, mallory = users(2)
    await group(parts, alice)
    page, total = await parts.sessions.list(mallory, status=None, agent_id=None, limit=50, offset=0)
    assert (page, total) == ([], 0)
