"""Read watermarks: forward only, clamped to the last seq, published as receipts."""

from __future__ import annotations

import pytest

from chatservice import events
from chatservice.components import Components
from chatservice.services.errors import InvalidInput
from tests.integration.helpers import BusTap, group, send, users


async def _watermark(parts: Components, sid: str, user_id: str) -> int:
    _, member = await parts.sessions.store.membership(sid, user_id)
    assert member is not None
    return member.last_read_seq


async def test_mark_read_moves_forward_and_never_back(parts: Components) -> None:
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    for i in range(5):
        await send(parts, alice, sid, f"m{i}")
    assert await parts.sessions.mark_read(bob, sid, 3) == (3, 2)
    assert await _watermark(parts, sid, bob.user_id) == 3
    assert await parts.sessions.mark_read(bob, sid, 1) == (3, 2)
    assert await _watermark(parts, sid, bob.user_id) == 3
    assert await parts.sessions.mark_read(bob, sid, 5) == (5, 0)
    assert await _watermark(parts, sid, alice.user_id) == 0


async def test_mark_read_is_clamped_to_the_last_seq(parts: Components) -> None:
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    await send(parts, alice, sid, "one")
    await send(parts, alice, sid, "two")
    assert await parts.sessions.mark_read(bob, sid, 1000) == (2, 0)
    assert await _watermark(parts, sid, bob.user_id) == 2
    # A later message is unread: the watermark did not run ahead of history.
    await send(parts, alice, sid, "three")
    page, _ = await parts.sessions.list(bob, status=None, agent_id=None, limit=5, offset=0)
    assert page[0].unread_count == 1


async def test_negative_seq_is_rejected(parts: Components) -> None:
    alice = users(1)[0]
    sid = await group(parts, alice)
    with pytest.raises(InvalidInput):
        await parts.sessions.mark_read(alice, sid, -1)


async def test_mark_read_publishes_a_receipt_only_when_the_watermark_moves(
    parts: Components,
) -> None:
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    for i in range(3):
        await send(parts, alice, sid, f"m{i}")
    tap = BusTap()
    await parts.bus.subscribe([events.session_channel(sid)], tap)
    try:
        await parts.sessions.mark_read(bob, sid, 2)
        await parts.sessions.mark_read(bob, sid, 2)  # no move
        await parts.sessions.mark_read(bob, sid, 1)  # backwards: no move
        await parts.sessions.mark_read(bob, sid, 50)  # clamped to 3
    finally:
        await parts.bus.unsubscribe([events.session_channel(sid)], tap)
    receipts = tap.of_type("receipt")
    assert receipts == [
        {"type": "receipt", "session_id": sid, "user_id": bob.user_id, "seq": 2, "status": "read"},
        {"type": "receipt", "session_id": sid, "user_id": bob.user_id, "seq": 3, "status": "read"},
    ]


async def test_mark_read_on_an_empty_session_stays_at_zero(parts: Components) -> None:
    alice = users(1)[0]
    sid = await group(parts, alice)
    tap = BusTap()
    await parts.bus.subscribe([events.session_channel(sid)], tap)
    try:
        assert await parts.sessions.mark_read(alice, sid, 7) == (0, 0)
    finally:
        await parts.bus.unsubscribe([events.session_channel(sid)], tap)
    assert tap.events == []
