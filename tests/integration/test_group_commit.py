"""Group commit: messages that arrive together are stored by one transaction, and still
get gap-free seqs in arrival order per session; one bad message fails alone.

Runs on SQLite and PostgreSQL (the `parts` fixture), through `MessageStore.append`.
"""

from __future__ import annotations

import asyncio

import pytest

from chatservice.components import Components
from chatservice.domain import Message, SenderType, new_id, utcnow
from chatservice.store.message_writer import MAX_GROUP, SessionNotWritable
from tests.integration.helpers import group, users


def plain(session_id: str, sender: str, content: str, cid: str | None = None) -> Message:
    return Message(
        message_id=new_id("msg"),
        session_id=session_id,
        seq=0,
        sender_type=SenderType.USER.value,
        sender_id=sender,
        message_type="text",
        content=content,
        metadata={"n": content},
        created_at=utcnow(),
        client_msg_id=cid,
    )


async def stored_seqs(parts: Components, session_id: str) -> list[tuple[int, str]]:
    messages = await parts.messages.store.after_seq(session_id, 0, 10_000)
    return [(m.seq, m.content) for m in messages]


async def test_appends_arriving_together_keep_arrival_order_per_session(
    parts: Components,
) -> None:
    owner, other = users(2, "gc")
    sessions = [await group(parts, owner, other) for _ in range(3)]
    store = parts.messages.store
    burst = [plain(sessions[i % 3], owner.user_id, f"{i}") for i in range(3 * MAX_GROUP + 7)]
    results = await asyncio.gather(*(store.append(m) for m in burst))
    assert all(created for _, created in results)
    for index, session_id in enumerate(sessions):
        contents = [m.content for m in burst if m.session_id == session_id]
        rows = await stored_seqs(parts, session_id)
        # Gap-free from 1, and the order the appends were called in.
        assert [seq for seq, _ in rows] == list(range(1, len(contents) + 1))
        assert [content for _, content in rows] == contents, index
    for message, (stored, _) in zip(burst, results, strict=True):
        assert stored.seq > 0 and stored.message_id == message.message_id


async def test_a_reused_client_msg_id_in_a_group_fails_alone(parts: Components) -> None:
    owner, other = users(2, "gc")
    sid = await group(parts, owner, other)
    store = parts.messages.store
    original, _ = await store.append(plain(sid, owner.user_id, "first", cid="same"))
    burst = [
        plain(sid, owner.user_id, "a"),
        plain(sid, owner.user_id, "retry", cid="same"),
        plain(sid, owner.user_id, "b"),
    ]
    results = await asyncio.gather(*(store.append(m) for m in burst))
    assert [created for _, created in results] == [True, False, True]
    assert results[1][0].message_id == original.message_id
    assert [content for _, content in await stored_seqs(parts, sid)] == ["first", "a", "b"]
    assert [seq for seq, _ in await stored_seqs(parts, sid)] == [1, 2, 3]


async def test_a_message_for_an_ended_session_fails_alone(parts: Components) -> None:
    owner, other = users(2, "gc")
    open_sid = await group(parts, owner, other)
    ended_sid = await group(parts, owner, other)
    await parts.sessions.end(owner, ended_sid)
    store = parts.messages.store
    results = await asyncio.gather(
        store.append(plain(open_sid, owner.user_id, "x")),
        store.append(plain(ended_sid, owner.user_id, "too late")),
        store.append(plain(open_sid, owner.user_id, "y")),
        return_exceptions=True,
    )
    assert isinstance(results[1], SessionNotWritable)
    assert [content for _, content in await stored_seqs(parts, open_sid)] == ["x", "y"]
    assert await stored_seqs(parts, ended_sid) == []


@pytest.mark.parametrize("waiters", [1, 40])
async def test_a_cancelled_caller_does_not_stop_the_others(parts: Components, waiters: int) -> None:
    owner, other = users(2, "gc")
    sid = await group(parts, owner, other)
    store = parts.messages.store
    tasks = [
        asyncio.create_task(store.append(plain(sid, owner.user_id, f"{i}"))) for i in range(waiters)
    ]
    tasks[0].cancel()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    stored = await stored_seqs(parts, sid)
    assert [seq for seq, _ in stored] == list(range(1, len(stored) + 1))
    assert len(stored) >= waiters - 1
    assert all(not isinstance(o, Exception) for o in outcomes[1:])
