"""`/ws`: one socket for all of a user's conversations, against a real server, with the
`websockets` client as a third party would use it.

Subscriptions with `since_seq` get their replay then live events, every frame names its
session, the user's own events arrive without any subscription, and refusals and lost
access are frames on a socket that stays open.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from chatservice.auth import TokenCodec
from tests.conftest import ServerProcess, new_user
from tests.e2e.conftest import bearer, recv_json, recv_until

JSON = dict[str, Any]
API = "/api/chat"


async def mux(server: ServerProcess, token: str) -> ClientConnection:
    ws = await websockets.connect(f"{server.ws_url}/ws?token={token}")
    hello = await recv_json(ws)
    assert hello["type"] == "connected", hello
    return ws


async def send(ws: ClientConnection, frame: JSON) -> None:
    await ws.send(json.dumps(frame))


async def subscribe(ws: ClientConnection, session_id: str, since_seq: int | None = None) -> JSON:
    frame: JSON = {"type": "subscribe", "session_id": session_id}
    if since_seq is not None:
        frame["since_seq"] = since_seq
    await send(ws, frame)
    return await recv_until(ws, "subscribed")


async def next_of(ws: ClientConnection, *kinds: str, timeout: float = 5.0) -> JSON:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        frame = await recv_json(ws, max(0.01, deadline - loop.time()))
        if frame.get("type") in kinds:
            return frame


async def quiet(ws: ClientConnection, kinds: tuple[str, ...], seconds: float = 0.5) -> None:
    """No frame of `kinds` arrives for `seconds` (a ping/pong pair bounds it)."""
    await asyncio.sleep(seconds)
    await send(ws, {"type": "ping"})
    while True:
        frame = await recv_json(ws)
        assert frame.get("type") not in kinds, frame
        if frame["type"] == "pong":
            return


class Person:
    def __init__(self, server: ServerProcess, tokens: TokenCodec, prefix: str) -> None:
        self.id = new_user(prefix)
        self.token = tokens.issue(self.id)
        self.http = httpx.AsyncClient(
            base_url=server.base_url, headers=bearer(self.token), timeout=10
        )

    async def group(self, *others: Person) -> str:
        made = await self.http.post(
            f"{API}/sessions", json={"kind": "group", "participants": [o.id for o in others]}
        )
        assert made.status_code == 201, made.text
        return str(made.json()["session_id"])

    async def say(self, sid: str, content: str) -> JSON:
        sent = await self.http.post(f"{API}/sessions/{sid}/messages", json={"content": content})
        assert sent.status_code == 201, sent.text
        return dict(sent.json())


@pytest.fixture
async def people(server: ServerProcess, tokens: TokenCodec) -> Any:
    made: list[Person] = []

    def make(prefix: str) -> Person:
        person = Person(server, tokens, prefix)
        made.append(person)
        return person

    yield make
    for person in made:
        await person.http.aclose()


async def test_one_socket_follows_two_sessions_in_order_with_replay(
    server: ServerProcess, people: Any
) -> None:
    alice, bob = people("alice"), people("bob")
    first, second = await alice.group(bob), await alice.group(bob)
    await alice.say(first, "before 1")
    await alice.say(first, "before 2")
    ws = await mux(server, bob.token)
    try:
        got = await subscribe(ws, first, since_seq=0)
        assert (got["session_id"], got["since_seq"], got["last_seq"]) == (first, 0, 2)
        replayed = [await next_of(ws, "message") for _ in range(2)]
        assert [(m["session_id"], m["seq"]) for m in replayed] == [(first, 1), (first, 2)]
        got = await subscribe(ws, second)
        assert got["since_seq"] == got["last_seq"] == 0
        for i in range(3):
            await alice.say(first, f"first {i}")
            await alice.say(second, f"second {i}")
        live = [await next_of(ws, "message") for _ in range(6)]
        by_session: dict[str, list[int]] = {}
        for m in live:
            by_session.setdefault(m["session_id"], []).append(m["seq"])
        assert by_session == {first: [3, 4, 5], second: [1, 2, 3]}

        # A frame acts on the session it names.
        await send(
            ws,
            {"type": "message", "session_id": second, "content": "from bob", "client_msg_id": "b1"},
        )
        echo = await next_of(ws, "message")
        assert (echo["session_id"], echo["seq"], echo["client_msg_id"]) == (second, 4, "b1")

        # After unsubscribe, that session is silent; the other still talks.
        await send(ws, {"type": "unsubscribe", "session_id": first})
        gone = await next_of(ws, "unsubscribed")
        assert gone == {"type": "unsubscribed", "session_id": first, "reason": "client"}
        await alice.say(first, "unheard")
        await alice.say(second, "heard")
        heard = await next_of(ws, "message")
        assert (heard["session_id"], heard["content"]) == (second, "heard")
        await quiet(ws, ("message",))
    finally:
        await ws.close()


async def test_refusals_are_error_frames_on_a_socket_that_stays_open(
    server: ServerProcess, people: Any
) -> None:
    alice, bob, mallory = people("alice"), people("bob"), people("mallory")
    sid = await alice.group(bob)
    ws = await mux(server, mallory.token)
    try:
        await send(ws, {"type": "subscribe", "session_id": sid})
        refused = await next_of(ws, "error")
        assert (refused["code"], refused["session_id"]) == ("FORBIDDEN", sid)
        await send(ws, {"type": "subscribe", "session_id": "sess_nope"})
        assert (await next_of(ws, "error"))["code"] == "SESSION_NOT_FOUND"
        for bad, code in (
            ({"type": "subscribe"}, "VALIDATION_ERROR"),
            ({"type": "subscribe", "session_id": 5}, "VALIDATION_ERROR"),
            ({"type": "subscribe", "session_id": "s\u0000x"}, "VALIDATION_ERROR"),
            ({"type": "subscribe", "session_id": sid, "since_seq": -1}, "VALIDATION_ERROR"),
            ({"type": "subscribe", "session_id": sid, "since_seq": "x"}, "VALIDATION_ERROR"),
            ({"type": "message", "content": "no session named"}, "VALIDATION_ERROR"),
            ({"type": "message", "session_id": sid, "content": "not subscribed"}, "NOT_SUBSCRIBED"),
            ({"type": "typing", "session_id": sid, "is_typing": True}, "NOT_SUBSCRIBED"),
            ({"type": "unsubscribe", "session_id": sid}, "NOT_SUBSCRIBED"),
            ({"type": "unsubscribe"}, "NOT_SUBSCRIBED"),
            ({"type": "subscribe!", "session_id": sid}, "UNKNOWN_TYPE"),
        ):
            await send(ws, bad)
            answer = await next_of(ws, "error")
            assert answer["code"] == code, (bad, answer)
        await ws.send(b"\x00binary")
        assert (await next_of(ws, "error"))["code"] == "BAD_FRAME"
        await ws.send("{not json")
        assert (await next_of(ws, "error"))["code"] == "BAD_JSON"
        # Nothing of the session leaked, and the socket still works.
        await alice.say(sid, "private")
        await quiet(ws, ("message",))
    finally:
        await ws.close()


async def test_a_second_subscribe_to_the_same_session_is_refused(
    server: ServerProcess, people: Any
) -> None:
    alice, bob = people("alice"), people("bob")
    sid = await alice.group(bob)
    ws = await mux(server, bob.token)
    try:
        await subscribe(ws, sid)
        await send(ws, {"type": "subscribe", "session_id": sid, "since_seq": 0})
        assert (await next_of(ws, "error"))["code"] == "ALREADY_SUBSCRIBED"
        await alice.say(sid, "once")
        assert (await next_of(ws, "message"))["seq"] == 1
        await quiet(ws, ("message",))
    finally:
        await ws.close()


async def test_the_users_own_events_arrive_without_subscribing(
    server: ServerProcess, people: Any
) -> None:
    alice, bob, carol = people("alice"), people("bob"), people("carol")
    ws = await mux(server, bob.token)
    try:
        sid = await alice.group(bob)
        created = await next_of(ws, "session_changed")
        assert (created["session_id"], created["change"], created["by"]) == (
            sid,
            "created",
            alice.id,
        )
        other = await alice.group(carol)
        added = await alice.http.post(
            f"{API}/sessions/{other}/participants", json={"user_ids": [bob.id]}
        )
        assert added.status_code == 200, added.text
        assert (await next_of(ws, "session_changed"))["change"] == "added"

        # Bob reads on another device: this socket's unread state follows.
        await alice.say(sid, "one")
        await alice.say(sid, "two")
        read = await bob.http.post(f"{API}/sessions/{sid}/read", json={"seq": 1})
        assert read.status_code == 200, read.text
        unread = await next_of(ws, "unread")
        assert (unread["session_id"], unread["last_read_seq"], unread["unread_count"]) == (
            sid,
            1,
            1,
        )

        # Removed: the subscription ends with a frame, the socket stays, the list updates.
        await subscribe(ws, other)
        removed = await alice.http.delete(f"{API}/sessions/{other}/participants/{bob.id}")
        assert removed.status_code in (200, 204), removed.text
        lost = await next_of(ws, "unsubscribed")
        assert (lost["session_id"], lost["reason"]) == (other, "forbidden")
        assert (await next_of(ws, "session_changed"))["change"] == "removed"
        await alice.say(other, "after removal")
        await send(ws, {"type": "message", "session_id": other, "content": "let me in"})
        assert (await next_of(ws, "error"))["code"] == "NOT_SUBSCRIBED"

        ended = await alice.http.post(f"{API}/sessions/{sid}/end")
        assert ended.status_code == 200, ended.text
        change = await next_of(ws, "session_changed")
        assert (change["session_id"], change["change"]) == (sid, "ended")
        await quiet(ws, ("message",))
    finally:
        await ws.close()


async def test_the_socket_needs_a_valid_token(server: ServerProcess, tokens: TokenCodec) -> None:
    for url in (f"{server.ws_url}/ws", f"{server.ws_url}/ws?token=garbage"):
        async with websockets.connect(url) as ws:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 5)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
