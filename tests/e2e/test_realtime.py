"""Live chat over WebSocket: echo, typing, receipts, presence, fan-out, since_seq recovery."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from chatservice.client import ChatAPIError, ConnectionClosed, RealtimeConnection
from tests.conftest import ServerProcess
from tests.e2e.conftest import (
    User,
    Users,
    frames_until_pong,
    recv_json,
    recv_until,
    ws_connect,
    ws_url,
)

JSON = dict[str, Any]


async def _group(users: Users, *names: str) -> tuple[list[User], str]:
    people = [users(name) for name in names]
    sid = (
        await people[0].client.create_session(title="room", participants=[p.id for p in people[1:]])
    )["session_id"]
    return people, sid


async def sdk_barrier(live: RealtimeConnection, timeout: float = 5.0) -> list[JSON]:
    """The SDK twin of `frames_until_pong`: ping, return what arrived before the pong."""
    await live.ping()
    seen = []
    while (frame := await live.receive(timeout))["type"] != "pong":
        seen.append(frame)
    return seen


async def sdk_messages(live: RealtimeConnection, count: int, timeout: float = 10.0) -> list[JSON]:
    got: list[JSON] = []
    while len(got) < count:
        frame = await live.receive(timeout)
        assert frame["type"] != "error", frame
        if frame["type"] == "message":
            got.append(frame)
    return got


async def raw_messages(ws: ClientConnection, count: int, timeout: float = 10.0) -> list[JSON]:
    got: list[JSON] = []
    while len(got) < count:
        frame = await recv_json(ws, timeout)
        assert frame["type"] != "error", frame
        if frame["type"] == "message":
            got.append(frame)
    return got


async def test_sender_gets_its_own_message_with_client_msg_id(
    server: ServerProcess, users: Users
) -> None:
    (alice, bob), sid = await _group(users, "alice", "bob")
    ws = await ws_connect(server, sid, alice.token)
    other = await ws_connect(server, sid, bob.token)
    try:
        await frames_until_pong(other)
        await ws.send(
            json.dumps(
                {
                    "type": "message",
                    "content": "안녕하세요 👋",
                    "client_msg_id": "cid-1",
                    "metadata": {"device": "desktop"},
                    "timestamp": "2025-10-29T10:30:00Z",  # A2G-compatible clients send it; ignored
                }
            )
        )
        echo = await recv_until(ws, "message")
        assert echo["client_msg_id"] == "cid-1"
        assert echo["message_id"].startswith("msg_")
        assert echo["seq"] == 1
        assert echo["sender_type"] == "user"
        assert echo["sender_id"] == alice.id
        assert echo["message_type"] == "text"
        assert echo["content"] == "안녕하세요 👋"
        assert echo["metadata"] == {"device": "desktop"}
        assert echo["timestamp"].endswith("Z") and echo["timestamp"] != "2025-10-29T10:30:00Z"

        got = await recv_until(other, "message")
        assert got == echo  # every connection gets the same frame

        await ws.send(json.dumps({"type": "ping"}))
        pong = await recv_until(ws, "pong")
        assert pong["type"] == "pong"
    finally:
        await ws.close()
        await other.close()
    [stored] = await alice.client.history(sid)
    assert stored["message_id"] == echo["message_id"]
    assert stored["client_msg_id"] == "cid-1"


async def test_ws_retry_with_same_client_msg_id_is_not_duplicated(users: Users) -> None:
    (alice, bob), sid = await _group(users, "alice", "bob")
    async with alice.client.realtime(sid) as live, bob.client.realtime(sid) as watcher:
        await sdk_barrier(watcher)
        for _ in range(3):
            await live.send_message("once", client_msg_id="retry-me")
        await live.send_message("next", client_msg_id="other")
        # The watcher sees one "once" and one "next": a retry is never fanned out again.
        got = await sdk_messages(watcher, 2)
        assert [(m["content"], m["seq"]) for m in got] == [("once", 1), ("next", 2)]
        assert await sdk_barrier(watcher) == []
        await sdk_messages(live, 2)
    assert [m["content"] for m in await alice.client.history(sid)] == ["once", "next"]


async def test_typing_reaches_others_but_not_the_sender(
    server: ServerProcess, users: Users
) -> None:
    (alice, bob), sid = await _group(users, "alice", "bob")
    a1 = await ws_connect(server, sid, alice.token)
    a2 = await ws_connect(server, sid, alice.token)  # alice's second device
    b1 = await ws_connect(server, sid, bob.token)
    try:
        for ws in (a1, a2, b1):
            await frames_until_pong(ws)
        await a1.send(json.dumps({"type": "typing", "is_typing": True}))
        typing = await recv_until(b1, "typing")
        assert typing["user_id"] == alice.id
        assert typing["is_typing"] is True
        # Neither of alice's devices hears her own typing.
        for ws in (a1, a2):
            assert [f for f in await frames_until_pong(ws) if f["type"] == "typing"] == []

        await a1.send(json.dumps({"type": "typing", "is_typing": False}))
        stopped = await recv_until(b1, "typing")
        assert (stopped["user_id"], stopped["is_typing"]) == (alice.id, False)

        # Bob typing reaches both of alice's devices.
        await b1.send(json.dumps({"type": "typing", "is_typing": True}))
        for ws in (a1, a2):
            seen = await recv_until(ws, "typing")
            assert (seen["user_id"], seen["is_typing"]) == (bob.id, True)
        # Bob leaving while "typing" clears his indicator for the others.
        await b1.close()
        cleared = await recv_until(a1, "typing")
        assert (cleared["user_id"], cleared["is_typing"]) == (bob.id, False)
    finally:
        for ws in (a1, a2, b1):
            await ws.close()
    # Typing is never stored.
    assert await alice.client.history(sid) == []


async def test_read_frame_sends_a_receipt_to_the_others(
    server: ServerProcess, users: Users
) -> None:
    (alice, bob), sid = await _group(users, "alice", "bob")
    for i in range(3):
        await alice.client.send_message(sid, f"m{i}")
    a = await ws_connect(server, sid, alice.token)
    b = await ws_connect(server, sid, bob.token)
    try:
        await frames_until_pong(a)
        await frames_until_pong(b)
        await b.send(json.dumps({"type": "read", "seq": 2}))
        receipt = await recv_until(a, "receipt")
        assert receipt["user_id"] == bob.id
        assert receipt["seq"] == 2
        assert receipt["status"] == "read"
        [entry] = (await bob.client.list_sessions())["sessions"]
        assert entry["unread_count"] == 1

        # Reading over REST takes the same path.
        await bob.client.mark_read(sid, 3)
        receipt = await recv_until(a, "receipt")
        assert (receipt["user_id"], receipt["seq"]) == (bob.id, 3)

        # A read that does not move the watermark sends nothing.
        await b.send(json.dumps({"type": "read", "seq": 1}))
        await frames_until_pong(b)
        assert [f for f in await frames_until_pong(a) if f["type"] == "receipt"] == []
    finally:
        await a.close()
        await b.close()


async def test_presence_follows_first_and_last_connection(
    server: ServerProcess, users: Users
) -> None:
    (alice, bob), sid = await _group(users, "alice", "bob")
    a = await ws_connect(server, sid, alice.token)
    b1 = b2 = None
    try:
        await frames_until_pong(a)
        b1 = await ws_connect(server, sid, bob.token)
        await frames_until_pong(b1)
        joined = await recv_until(a, "system")
        assert joined["event"] == "user_joined"
        assert joined["user_id"] == bob.id
        assert joined["timestamp"].endswith("Z")

        # A second device of bob: no second user_joined.
        b2 = await ws_connect(server, sid, bob.token)
        await frames_until_pong(b2)
        assert [f for f in await frames_until_pong(a) if f["type"] == "system"] == []

        # One of the two devices leaves: bob is still here.
        await b1.close()
        await asyncio.sleep(0.3)
        assert [f for f in await frames_until_pong(a) if f["type"] == "system"] == []

        await b2.close()
        left = await recv_until(a, "system")
        assert (left["event"], left["user_id"]) == ("user_left", bob.id)
    finally:
        for ws in (a, b1, b2):
            if ws is not None:
                await ws.close()


async def test_rest_and_ws_messages_reach_every_connection_in_seq_order(
    server: ServerProcess, users: Users
) -> None:
    (alice, bob, carol), sid = await _group(users, "alice", "bob", "carol")
    outsider = users("outsider")
    elsewhere = (await outsider.client.create_session(title="elsewhere"))["session_id"]
    per_sender = 8

    async with (
        alice.client.realtime(sid) as a1,
        alice.client.realtime(sid) as a2,
        bob.client.realtime(sid) as b1,
        outsider.client.realtime(elsewhere) as o1,
    ):
        c1 = await ws_connect(server, sid, carol.token)
        try:
            for live in (a1, a2, b1, o1):
                await sdk_barrier(live)
            await frames_until_pong(c1)

            async def alice_ws() -> None:
                for i in range(per_sender):
                    await a1.send_message(f"alice-ws {i}")

            async def alice_rest() -> None:
                for i in range(per_sender):
                    await alice.client.send_message(sid, f"alice-rest {i}")

            async def bob_rest() -> None:
                for i in range(per_sender):
                    await bob.client.send_message(sid, f"bob-rest {i}")

            async def carol_ws() -> None:
                for i in range(per_sender):
                    msg = {"type": "message", "content": f"carol-ws {i}", "client_msg_id": f"c{i}"}
                    await c1.send(json.dumps(msg))

            await asyncio.gather(alice_ws(), alice_rest(), bob_rest(), carol_ws())
            total = 4 * per_sender
            streams = [
                await sdk_messages(a1, total),
                await sdk_messages(a2, total),
                await sdk_messages(b1, total),
                await raw_messages(c1, total),
            ]
            history = await bob.client.history(sid)
            expected = [(m["seq"], m["message_id"], m["content"]) for m in history]
            assert [seq for seq, _, _ in expected] == list(range(1, total + 1))
            for stream in streams:
                assert [(m["seq"], m["message_id"], m["content"]) for m in stream] == expected
            # Nothing more arrives (no duplicates), and nothing leaked to another session.
            for live in (a1, a2, b1):
                assert [f for f in await sdk_barrier(live) if f["type"] == "message"] == []
            assert [f for f in await frames_until_pong(c1) if f["type"] == "message"] == []
            assert [f for f in await sdk_barrier(o1) if f["type"] == "message"] == []
        finally:
            await c1.close()


async def test_since_seq_replays_exactly_what_was_missed_then_goes_live(
    server: ServerProcess, users: Users
) -> None:
    (alice, bob), sid = await _group(users, "alice", "bob")
    for i in range(1, 6):
        await alice.client.send_message(sid, f"m{i}", client_msg_id=f"c{i}")

    async with bob.client.realtime(sid, since_seq=2) as live:
        replayed = await sdk_messages(live, 3)
        assert [(m["seq"], m["content"], m["client_msg_id"]) for m in replayed] == [
            (3, "m3", "c3"),
            (4, "m4", "c4"),
            (5, "m5", "c5"),
        ]
        assert all(m["type"] == "message" and m["sender_id"] == alice.id for m in replayed)
        assert live.last_seq == 5
        await alice.client.send_message(sid, "m6")
        [live_one] = await sdk_messages(live, 1)
        assert live_one["seq"] == 6
        assert [f for f in await sdk_barrier(live) if f["type"] == "message"] == []

    # since_seq=0 replays everything; raw client this time.
    ws = await ws_connect(server, sid, bob.token, since_seq=0)
    try:
        assert [m["seq"] for m in await raw_messages(ws, 6)] == [1, 2, 3, 4, 5, 6]
        assert [f for f in await frames_until_pong(ws) if f["type"] == "message"] == []
    finally:
        await ws.close()

    # since_seq beyond the end: nothing replayed, and live messages still arrive.
    ws = await ws_connect(server, sid, bob.token, since_seq=999)
    try:
        assert [f for f in await frames_until_pong(ws) if f["type"] == "message"] == []
        await alice.client.send_message(sid, "m7")
        [m7] = await raw_messages(ws, 1)
        assert m7["seq"] == 7
    finally:
        await ws.close()

    # Without since_seq: no history on connect, only live messages.
    ws = await ws_connect(server, sid, bob.token)
    try:
        assert [f for f in await frames_until_pong(ws) if f["type"] == "message"] == []
    finally:
        await ws.close()


async def test_since_seq_reconnects_while_another_client_sends_continuously(
    server: ServerProcess, users: Users
) -> None:
    """A receiver drops and reconnects with since_seq several times while 200 messages
    stream in over WebSocket: every seq arrives exactly once, in order."""
    (alice, bob), sid = await _group(users, "alice", "bob")
    total = 200
    done_sending = asyncio.Event()

    async def sender() -> None:
        async with alice.client.realtime(sid) as live:
            await sdk_barrier(live)
            for i in range(total):
                await live.send_message(f"n{i}", client_msg_id=f"c{i}")
                await asyncio.sleep(0.004)
            done_sending.set()
            while live.last_seq < total:  # read our echoes so the close is clean
                await live.receive(15)

    # The receiver uses the raw library with flow control off (max_queue=None) so it can
    # drop a connection instantly whatever is still buffered.
    segments: list[tuple[int | None, list[int]]] = []
    ws = await websockets.connect(ws_url(server, sid, bob.token), max_queue=None)
    await frames_until_pong(ws)
    sending = asyncio.create_task(sender())
    last = 0
    since: int | None = None
    drops = [15, 40, 80, 120, 160]
    try:
        while True:
            seen: list[int] = []
            segments.append((since, seen))
            while last < total:
                frame = await recv_json(ws, 15)
                if frame["type"] == "message":
                    seen.append(frame["seq"])
                    last = frame["seq"]
                    if drops and last >= drops[0]:
                        drops.pop(0)
                        break
            await ws.close()
            if last >= total:
                break
            await asyncio.sleep(0.03)  # messages keep coming while we are away
            since = last
            ws = await websockets.connect(
                ws_url(server, sid, bob.token, since_seq=since), max_queue=None
            )
        await asyncio.wait_for(sending, 30)
    finally:
        await ws.close()
        if not sending.done():
            sending.cancel()
    assert done_sending.is_set()

    assert len(segments) == 6, [(s, len(seen)) for s, seen in segments]
    for since_seq, seen in segments:
        start = (since_seq or 0) + 1
        assert seen == list(range(start, start + len(seen))), (since_seq, seen)
    received = [seq for _, seen in segments for seq in seen]
    assert received == list(range(1, total + 1))
    history = await bob.client.history(sid)
    assert [m["seq"] for m in history] == received
    assert [m["content"] for m in history] == [f"n{i}" for i in range(total)]


async def test_sdk_reconnect_with_last_seq_while_rest_sender_runs(users: Users) -> None:
    """The SDK way: reconnect with `since_seq=live.last_seq` while messages come over REST."""
    (alice, bob), sid = await _group(users, "alice", "bob")
    total = 150

    async def sender() -> None:
        for i in range(total):
            await alice.client.send_message(sid, f"r{i}")

    received: list[int] = []
    live = await bob.client.realtime(sid).connect()
    await sdk_barrier(live)
    sending = asyncio.create_task(sender())
    try:
        for threshold in (30, 70, 110, total):
            while live.last_seq < threshold:
                frame = await live.receive(15)
                if frame["type"] == "message":
                    received.append(frame["seq"])
            if threshold == total:
                break
            last_seq = live.last_seq
            await live.close()
            await asyncio.sleep(0.05)
            live = await RealtimeConnection(
                live.base_url, sid, bob.token, since_seq=last_seq
            ).connect()
        await asyncio.wait_for(sending, 30)
    finally:
        await live.close()
        sending.cancel()
    assert received == list(range(1, total + 1))


async def test_ending_a_session_is_announced_and_it_becomes_read_only(users: Users) -> None:
    (alice, bob), sid = await _group(users, "alice", "bob")
    async with alice.client.realtime(sid) as a, bob.client.realtime(sid) as b:
        await sdk_barrier(a)
        await sdk_barrier(b)
        await alice.client.end_session(sid)
        ended = await b.receive_until("system")
        assert (ended["event"], ended["user_id"]) == ("session_ended", alice.id)
        cid = await b.send_message("after the end")
        error = await b.receive_until("error")
        assert error["code"] == "SESSION_CLOSED"
        assert error.get("client_msg_id") == cid
        # The connection is still usable for everything that is not a message.
        assert await sdk_barrier(b) == []
    assert await alice.client.history(sid) == []


async def test_deleting_a_session_is_announced_to_connected_members(users: Users) -> None:
    (alice, bob), sid = await _group(users, "alice", "bob")
    async with bob.client.realtime(sid) as b:
        await sdk_barrier(b)
        await alice.client.delete_session(sid)
        deleted = await b.receive_until("system")
        assert (deleted["event"], deleted["user_id"]) == ("session_deleted", alice.id)
        # Then the server closes the socket like a connect to a deleted session: 4404.
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await b.receive(5)
        assert closed.value.code == 4404
    with pytest.raises(ChatAPIError) as err:
        await alice.client.history(sid)
    assert err.value.status == 404


async def test_sdk_iteration_ends_when_the_server_closes(users: Users) -> None:
    (alice,), sid = await _group(users, "alice")
    await alice.client.delete_session(sid)
    frames: list[JSON] = []

    async def collect() -> None:
        async with alice.client.realtime(sid) as live:
            async for frame in live:
                frames.append(frame)

    await asyncio.wait_for(collect(), 10)  # the loop ends on the server's 4404 close
    assert frames == []


async def test_sdk_close_is_prompt_with_unread_frames(small_users: Users) -> None:
    """Leaving `async with chat.realtime(...)` in a busy room must not hang.

    The SDK's websockets connection stops reading from the socket once 16 frames sit
    unread (websockets' default max_queue flow control); its close() then cannot see the
    server's close frame and waits the whole close_timeout (10 s) before giving up.
    Client-side only, so one server (SQLite) is enough.
    """
    (alice, bob), sid = await _group(small_users, "alice", "bob")
    live = await bob.client.realtime(sid).connect()
    await sdk_barrier(live)
    for i in range(40):
        await alice.client.send_message(sid, f"busy {i}")
    await asyncio.sleep(0.3)
    started = time.monotonic()
    try:
        await asyncio.wait_for(live.close(), 3.0)
    except TimeoutError:
        raise AssertionError(
            f"RealtimeConnection.close() still waiting after {time.monotonic() - started:.1f}s "
            "with 40 unread frames"
        ) from None


async def test_frames_sent_back_to_back_are_stored_in_the_order_sent(
    server: ServerProcess, users: Users
) -> None:
    """The reader goes on reading while earlier messages commit; their seqs still follow
    the order the client sent them, a bad frame in the middle fails alone, and a frame
    that is not a message waits for the messages before it."""
    (alice,), sid = await _group(users, "burst")
    async with await ws_connect(server, sid, alice.token, max_queue=4096) as ws:
        await recv_until(ws, "connected")
        count = 200
        for i in range(count):
            frame = {"type": "message", "content": f"m{i}", "client_msg_id": f"c{i}"}
            if i == 100:
                frame["content"] = "   "  # refused, alone
            await ws.send(json.dumps(frame))
        await ws.send(json.dumps({"type": "read", "seq": count - 1}))
        echoes: list[JSON] = []
        refused: list[JSON] = []
        read_ok = False
        while len(echoes) < count - 1 or not refused or not read_ok:
            frame = await recv_json(ws, timeout=20)
            if frame["type"] == "message":
                echoes.append(frame)
            elif frame["type"] == "error":
                refused.append(frame)
            elif frame["type"] == "receipt" and frame["user_id"] == alice.id:
                assert frame["seq"] == count - 1  # the read waited for every message
                read_ok = True
        assert [e["seq"] for e in echoes] == list(range(1, count))
        assert [e["client_msg_id"] for e in echoes] == [f"c{i}" for i in range(count) if i != 100]
        assert [(r["code"], r.get("client_msg_id")) for r in refused] == [("EMPTY_CONTENT", "c100")]
