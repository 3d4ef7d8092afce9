"""Fan-out from the services through the bus and the hub to live connections.

The clients here are in-process consumers (`FakeSocket`) behind real `Connection`
objects attached to the real hub of `parts`; messages go through the real services
and database, so the hub's gap filling reads the real history.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from chatservice import events
from chatservice.components import Components
from chatservice.domain import Principal
from chatservice.realtime.codec import NATIVE, CloseReason
from chatservice.realtime.connection import Subscription
from chatservice.services.messages import Draft
from tests.integration.helpers import (
    FakeSocket,
    attach,
    detach,
    event_bytes,
    eventually,
    group,
    send,
    settle,
    store_silently,
    users,
)

CLOSE_SLOW_CONSUMER = NATIVE.close_code(CloseReason.SLOW_CONSUMER)
Connect = Callable[..., Awaitable[tuple[Subscription, FakeSocket]]]


@pytest.fixture
async def connect(parts: Components) -> AsyncIterator[Connect]:
    """Attach in-process clients to the hub; all are detached and stopped afterwards."""
    opened: list[Subscription] = []

    async def _connect(
        session_id: str,
        who: Principal,
        *,
        socket: FakeSocket | None = None,
        queue_size: int = 1024,
        live: bool = True,
    ) -> tuple[Subscription, FakeSocket]:
        socket = socket or FakeSocket()
        sub = await attach(parts.hub, session_id, who.user_id, socket, queue_size)
        opened.append(sub)
        if live:
            await sub.go_live()
        return sub, socket

    yield _connect
    for sub in opened:
        await detach(parts.hub, sub)


async def disconnect(parts: Components, sub: Subscription) -> None:
    await detach(parts.hub, sub)


async def replay(
    parts: Components,
    conn: Subscription,
    since_seq: int,
    page: int = 500,
    between_pages: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """What the WebSocket endpoint does for `since_seq` before `go_live`."""
    conn.last_seq = min(since_seq, await parts.history.last_seq(conn.session_id))
    while True:
        found = await parts.history.after(conn.session_id, conn.last_seq, page)
        for envelope in found:
            await conn.replay(envelope)
        if len(found) < page or conn.conn.closed:
            return
        if between_pages is not None:
            await between_pages()


# -- fan-out ------------------------------------------------------------------------------


async def test_every_connection_gets_each_message_once_in_seq_order(
    parts: Components, connect: Connect
) -> None:
    alice, bob, carol = users(3)
    sid = await group(parts, alice, bob, carol)
    sockets = [
        (await connect(sid, alice))[1],
        (await connect(sid, alice))[1],  # a second device
        (await connect(sid, bob))[1],
        (await connect(sid, carol))[1],
    ]
    authors = [alice, bob, carol]
    for i in range(30):
        await send(parts, authors[i % 3], sid, f"m{i + 1}")
    for socket in sockets:
        await eventually(lambda s=socket: len(s.seqs()) >= 30, "30 messages on every connection")
    await settle()
    for socket in sockets:
        frames = socket.of_type("message")
        assert [f["seq"] for f in frames] == list(range(1, 31))
        assert [f["content"] for f in frames] == [f"m{i}" for i in range(1, 31)]
        assert [f["sender_id"] for f in frames] == [authors[i % 3].user_id for i in range(30)]
        assert all(f["session_id"] == sid for f in frames)


async def test_concurrent_sends_reach_every_connection_in_seq_order(
    parts: Components, connect: Connect
) -> None:
    members = users(6, "fan")
    sid = await group(parts, members[0], *members[1:])
    sockets = [(await connect(sid, who))[1] for who in members[:4]]
    total = 150
    results = await asyncio.gather(
        *(parts.messages.send(members[i % 6], sid, Draft(content=f"c{i}")) for i in range(total))
    )
    by_seq = {r.message.seq: r.message for r in results}
    for socket in sockets:
        await eventually(lambda s=socket: len(s.seqs()) >= total, f"{total} messages")
    await settle()
    for socket in sockets:
        frames = socket.of_type("message")
        assert [f["seq"] for f in frames] == list(range(1, total + 1))
        for frame in frames:
            sent = by_seq[frame["seq"]]
            assert (frame["message_id"], frame["sender_id"], frame["content"]) == (
                sent.message_id,
                sent.sender_id,
                sent.content,
            )


async def test_the_sender_gets_its_own_message_back_with_its_client_msg_id(
    parts: Components, connect: Connect
) -> None:
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    _, mine = await connect(sid, alice)
    result = await parts.messages.send(alice, sid, Draft(content="echo?", client_msg_id="c-77"))
    await eventually(lambda: len(mine.seqs()) == 1, "own message")
    (frame,) = mine.of_type("message")
    assert frame["message_id"] == result.message.message_id
    assert (frame["client_msg_id"], frame["seq"], frame["sender_id"]) == (
        "c-77",
        1,
        alice.user_id,
    )
    # A retry of the same client_msg_id is not delivered a second time.
    await parts.messages.send(alice, sid, Draft(content="echo?", client_msg_id="c-77"))
    await send(parts, bob, sid, "after")
    await eventually(lambda: len(mine.seqs()) == 2, "the next message")
    assert mine.seqs() == [1, 2]


async def test_connections_only_get_their_own_sessions_events(
    parts: Components, connect: Connect
) -> None:
    alice, bob = users(2)
    here = await group(parts, alice, bob)
    there = await group(parts, alice, bob)
    _, here_socket = await connect(here, bob)
    _, there_socket = await connect(there, bob)
    await send(parts, alice, here, "for here")
    await send(parts, alice, there, "for there")
    await eventually(lambda: here_socket.seqs() == [1], "here")
    await eventually(lambda: there_socket.seqs() == [1], "there")
    await settle()
    assert [f["content"] for f in here_socket.of_type("message")] == ["for here"]
    assert [f["content"] for f in there_socket.of_type("message")] == ["for there"]


async def test_a_connection_holds_frames_until_it_goes_live(
    parts: Components, connect: Connect
) -> None:
    alice = users(1)[0]
    sid = await group(parts, alice)
    conn, socket = await connect(sid, alice, live=False)
    for i in range(3):
        await send(parts, alice, sid, f"held {i}")
    await settle()
    assert socket.frames == []
    await conn.go_live()
    await eventually(lambda: socket.seqs() == [1, 2, 3], "held frames after go_live")


async def test_messages_from_before_the_connection_are_not_pushed_live(
    parts: Components, connect: Connect
) -> None:
    alice = users(1)[0]
    sid = await group(parts, alice)
    await send(parts, alice, sid, "old")
    _, socket = await connect(sid, alice)
    await send(parts, alice, sid, "new")
    await eventually(lambda: socket.seqs() == [2], "only the new message")
    await settle()
    assert socket.seqs() == [2]


async def test_receipts_and_session_end_reach_connections(
    parts: Components, connect: Connect
) -> None:
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    _, socket = await connect(sid, alice)
    await send(parts, alice, sid, "read me")
    await parts.sessions.mark_read(bob, sid, 1)
    await parts.sessions.end(alice, sid)
    await eventually(lambda: bool(socket.system("session_ended")), "session_ended")
    receipts = socket.of_type("receipt")
    assert [(r["user_id"], r["seq"], r["status"]) for r in receipts] == [(bob.user_id, 1, "read")]
    assert socket.system("session_ended") == [alice.user_id]


async def test_connections_attaching_together_to_a_new_room_each_get_every_message_once(
    parts: Components, connect: Connect
) -> None:
    members = users(8, "crowd")
    sid = await group(parts, members[0], *members[1:])
    attached = await asyncio.gather(*(connect(sid, who) for who in members))
    sockets = [socket for _, socket in attached]
    room = parts.hub.room(sid)
    assert room is not None and len(room.subscriptions) == len(members)
    for i in range(10):
        await send(parts, members[i % 8], sid, f"m{i}")
    for socket in sockets:
        await eventually(lambda s=socket: len(s.seqs()) >= 10, "ten messages")
    await settle()
    for socket in sockets:
        assert socket.seqs() == list(range(1, 11))


# -- typing and presence ------------------------------------------------------------------


async def test_typing_is_not_sent_to_the_typers_own_connections(
    parts: Components, connect: Connect
) -> None:
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    _, alice_phone = await connect(sid, alice)
    _, alice_laptop = await connect(sid, alice)
    _, bob_socket = await connect(sid, bob)
    assert await parts.typing.set_typing(sid, alice.user_id, True)
    await eventually(lambda: bool(bob_socket.of_type("typing")), "bob sees alice typing")
    assert bob_socket.of_type("typing") == [
        {"type": "typing", "session_id": sid, "user_id": alice.user_id, "is_typing": True}
    ]
    # A message published after the typing event reaches alice: by then the typing
    # frame would have been there too.
    await send(parts, bob, sid, "hm?")
    for socket in (alice_phone, alice_laptop):
        await eventually(lambda s=socket: s.seqs() == [1], "alice gets the message")
        assert socket.of_type("typing") == []
    assert await parts.typing.set_typing(sid, alice.user_id, False)
    await eventually(lambda: len(bob_socket.of_type("typing")) == 2, "typing stopped")
    assert bob_socket.of_type("typing")[-1]["is_typing"] is False


async def test_presence_follows_first_connection_and_last_disconnect(
    parts: Components, connect: Connect
) -> None:
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    _, watcher = await connect(sid, bob)
    await eventually(lambda: watcher.system("user_joined") == [bob.user_id], "own join")

    phone, _ = await connect(sid, alice)
    await eventually(
        lambda: watcher.system("user_joined") == [bob.user_id, alice.user_id], "alice joins"
    )
    laptop, _ = await connect(sid, alice)  # a second device: not a new join
    await disconnect(parts, phone)  # one device left: not a leave
    await send(parts, bob, sid, "marker")
    await eventually(lambda: watcher.seqs() == [1], "marker")
    assert watcher.system("user_joined") == [bob.user_id, alice.user_id]
    assert watcher.system("user_left") == []

    await disconnect(parts, laptop)
    await eventually(lambda: watcher.system("user_left") == [alice.user_id], "alice leaves")
    frame = next(f for f in watcher.of_type("system") if f["event"] == "user_left")
    assert frame["session_id"] == sid
    assert frame["timestamp"].endswith("Z")


async def test_the_room_closes_with_its_last_connection(
    parts: Components, connect: Connect
) -> None:
    alice = users(1)[0]
    sid = await group(parts, alice)
    before = parts.hub.connection_count
    one, _ = await connect(sid, alice)
    two, _ = await connect(sid, alice)
    assert parts.hub.room(sid) is not None
    assert parts.hub.connection_count == before + 2
    await disconnect(parts, one)
    assert parts.hub.room(sid) is not None
    await disconnect(parts, two)
    assert parts.hub.room(sid) is None
    assert parts.hub.connection_count == before


# -- the sequencer ------------------------------------------------------------------------


async def test_out_of_order_publishes_are_released_in_seq_order(
    parts: Components, connect: Connect
) -> None:
    parts.hub.gap_timeout = 30  # long enough that only the publish can release seq 2
    alice = users(1)[0]
    sid = await group(parts, alice)
    _, socket = await connect(sid, alice)
    m1, m2, m3 = [await store_silently(parts, sid, alice.user_id, f"m{i}") for i in (1, 2, 3)]
    channel = events.session_channel(sid)
    await parts.bus.publish(channel, event_bytes(m1))
    await parts.bus.publish(channel, event_bytes(m3))
    await eventually(lambda: socket.seqs() == [1], "seq 1")
    await settle(0.2)
    assert socket.seqs() == [1]  # seq 3 waits for seq 2
    await parts.bus.publish(channel, event_bytes(m2))
    await eventually(lambda: socket.seqs() == [1, 2, 3], "seq 2 then 3")
    assert [f["message_id"] for f in socket.of_type("message")] == [
        m1.message_id,
        m2.message_id,
        m3.message_id,
    ]


async def test_a_duplicate_publish_is_delivered_once(parts: Components, connect: Connect) -> None:
    alice = users(1)[0]
    sid = await group(parts, alice)
    _, socket = await connect(sid, alice)
    result = await parts.messages.send(alice, sid, Draft(content="once"))
    await parts.bus.publish(events.session_channel(sid), event_bytes(result.message))
    await send(parts, alice, sid, "twice?")
    await eventually(lambda: len(socket.seqs()) >= 2, "two messages")
    await settle()
    assert socket.seqs() == [1, 2]


async def test_a_lost_publish_is_filled_from_the_database(
    parts: Components, connect: Connect
) -> None:
    parts.hub.gap_timeout = 0.05
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    _, socket = await connect(sid, bob)
    await send(parts, alice, sid, "published 1")
    lost = [await store_silently(parts, sid, alice.user_id, f"lost {i}") for i in (2, 3)]
    await send(parts, alice, sid, "published 4")
    await eventually(lambda: len(socket.seqs()) >= 4, "the gap filled")
    await settle()
    frames = socket.of_type("message")
    assert [f["seq"] for f in frames] == [1, 2, 3, 4]
    assert [f["content"] for f in frames] == ["published 1", "lost 2", "lost 3", "published 4"]
    assert [f["message_id"] for f in frames[1:3]] == [m.message_id for m in lost]


# -- slow consumers -----------------------------------------------------------------------


async def test_a_client_that_stops_reading_is_closed_without_holding_back_others(
    parts: Components, connect: Connect
) -> None:
    alice, bob, carol = users(3)
    sid = await group(parts, alice, bob, carol)
    stuck = FakeSocket(stall=True)
    stuck_conn, _ = await connect(sid, bob, socket=stuck, queue_size=4)
    _, healthy = await connect(sid, carol, queue_size=4)
    for i in range(12):
        # Every send completes promptly although one client never reads.
        await asyncio.wait_for(send(parts, alice, sid, f"m{i + 1}"), timeout=5)
        await eventually(lambda n=i + 1: len(healthy.seqs()) == n, f"healthy has {i + 1}")
    await eventually(lambda: stuck.closed is not None, "the stuck client is closed")
    assert stuck.closed is not None
    assert stuck.closed[0] == CLOSE_SLOW_CONSUMER == 4008
    assert stuck_conn.conn.closed is True
    assert stuck.frames == []
    assert healthy.seqs() == list(range(1, 13))
    assert healthy.closed is None


async def test_a_client_that_never_goes_live_is_closed_once_its_backlog_overflows(
    parts: Components, connect: Connect
) -> None:
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    stuck_conn, stuck = await connect(sid, bob, queue_size=3, live=False)
    _, healthy = await connect(sid, alice)
    for i in range(6):
        await send(parts, alice, sid, f"m{i}")
    await eventually(lambda: stuck.closed is not None, "the backlog overflows")
    assert stuck.closed is not None and stuck.closed[0] == CLOSE_SLOW_CONSUMER
    assert stuck_conn.conn.closed is True
    await eventually(lambda: len(healthy.seqs()) == 6, "the other client")
    assert healthy.seqs() == list(range(1, 7))


# -- since_seq replay ---------------------------------------------------------------------


async def test_replay_then_live_has_no_gap_and_no_duplicate_under_concurrent_sends(
    parts: Components, connect: Connect
) -> None:
    """Messages committed before, during and after the replay each arrive exactly once.

    Three waves of concurrent senders: the first is running when the client attaches,
    the second is released after the replay's first page (and fully committed and
    published before the replay goes on), the third only after the client is live.
    """
    members = users(5, "replay")
    sid = await group(parts, members[0], *members[1:])
    for i in range(40):
        await send(parts, members[i % 5], sid, f"before {i}")
    waves = (60, 30, 30)
    total = 40 + sum(waves)
    during_replay, live = asyncio.Event(), asyncio.Event()
    progress = asyncio.Condition()
    done = 0

    async def send_one(i: int) -> None:
        nonlocal done
        if i < waves[0]:
            await asyncio.sleep(i * 0.002)
        elif i < waves[0] + waves[1]:
            await during_replay.wait()
        else:
            await live.wait()
        await parts.messages.send(members[i % 5], sid, Draft(content=f"during {i}"))
        async with progress:
            done += 1
            progress.notify_all()

    async def reached(count: int) -> None:
        async with progress:
            await progress.wait_for(lambda: done >= count)

    async def second_wave_lands() -> None:
        if not during_replay.is_set():
            during_replay.set()
            await reached(waves[0] + waves[1])

    sending = asyncio.gather(*(send_one(i) for i in range(sum(waves))))
    await reached(5)
    conn, socket = await connect(sid, members[1], live=False)
    at_start = await parts.history.last_seq(sid)
    await replay(parts, conn, since_seq=10, page=10, between_pages=second_wave_lands)
    at_live = await parts.history.last_seq(sid)
    await conn.go_live()
    live.set()
    await sending
    assert during_replay.is_set()
    assert at_start + waves[1] <= at_live < total

    await eventually(lambda: len(socket.seqs()) >= total - 10, "replay plus live")
    await settle()
    assert socket.seqs() == list(range(11, total + 1))
    page = await parts.messages.page(members[0], sid, before=None, after="10", limit=200)
    assert [f["message_id"] for f in socket.of_type("message")] == [
        m.message_id for m in page.messages
    ]


async def test_replay_from_zero_sends_the_whole_history_then_live(
    parts: Components, connect: Connect
) -> None:
    alice = users(1)[0]
    sid = await group(parts, alice)
    for i in range(5):
        await send(parts, alice, sid, f"h{i}")
    conn, socket = await connect(sid, alice, live=False)
    await replay(parts, conn, since_seq=0)
    await conn.go_live()
    await send(parts, alice, sid, "live")
    await eventually(lambda: len(socket.seqs()) >= 6, "history and live")
    await settle()
    assert socket.seqs() == [1, 2, 3, 4, 5, 6]


async def test_replay_past_the_end_sends_only_live_messages(
    parts: Components, connect: Connect
) -> None:
    alice = users(1)[0]
    sid = await group(parts, alice)
    for i in range(3):
        await send(parts, alice, sid, f"h{i}")
    conn, socket = await connect(sid, alice, live=False)
    await replay(parts, conn, since_seq=99)
    await conn.go_live()
    await send(parts, alice, sid, "live")
    await eventually(lambda: bool(socket.seqs()), "the live message")
    await settle()
    assert socket.seqs() == [4]
