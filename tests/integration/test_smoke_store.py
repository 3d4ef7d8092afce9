from __future__ import annotations

from chatservice.components import Components
from chatservice.domain import NewSession, Principal
from chatservice.services.messages import Draft
from tests.conftest import new_user


async def test_send_assigns_seq(parts: Components) -> None:
    alice = Principal(new_user())
    detail, created = await parts.sessions.create(alice, NewSession(kind="group"))
    assert created
    sid = detail.session.session_id
    first = await parts.messages.send(alice, sid, Draft(content="one"))
    second = await parts.messages.send(alice, sid, Draft(content="two"))
    assert (first.message.seq, second.message.seq) == (1, 2)
