"""Bad input over REST and WebSocket: a precise error, and the server (and the very
connection) keeps working afterwards."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection

from chatservice.auth import TokenCodec
from tests.conftest import ServerProcess
from tests.e2e.conftest import (
    SMALL_BODY_LIMIT,
    SMALL_FRAME_LIMIT,
    User,
    Users,
    assert_server_works,
    close_code,
    frames_until_pong,
    recv_json,
    recv_until,
    send_and_echo,
    ws_connect,
)

API = "/api/chat"


def assert_error(response: httpx.Response, status: int, *codes: str) -> dict[str, Any]:
    assert response.status_code == status, (response.request.url, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert error["code"] in codes, error
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in response.text
    return dict(error)


@pytest.fixture
async def room(users: Users) -> tuple[User, User, str]:
    alice, bob = users("alice"), users("bob")
    sid = (await alice.client.create_session(title="bad input", participants=[bob.id]))[
        "session_id"
    ]
    await alice.client.send_message(sid, "before")
    return alice, bob, sid


# -- REST -----------------------------------------------------------------------------------


async def test_malformed_json_bodies(
    http: httpx.AsyncClient, room: tuple[User, User, str], server: ServerProcess, tokens: TokenCodec
) -> None:
    alice, _, sid = room
    headers = {**alice.headers, "content-type": "application/json"}
    for path in (f"{API}/sessions", f"{API}/sessions/{sid}/messages", f"{API}/sessions/{sid}/read"):
        for raw in (b"{not json", b'{"content": "x",}', b"\xff\xfe", b'{"content": "x"'):
            response = await http.post(path, headers=headers, content=raw)
            assert_error(response, 422, "VALIDATION_ERROR")
        # Valid JSON of the wrong shape.
        for raw in (b"[]", b'"text"', b"null", b"42"):
            response = await http.post(path, headers=headers, content=raw)
            assert_error(response, 422, "VALIDATION_ERROR")
    assert (await alice.client.list_messages(sid))["total"] == 1
    await assert_server_works(server.base_url, tokens)


async def test_wrong_field_types_are_422(
    http: httpx.AsyncClient, room: tuple[User, User, str], server: ServerProcess, tokens: TokenCodec
) -> None:
    alice, bob, sid = room
    cases: list[tuple[str, dict[str, Any], str]] = [
        (f"{API}/sessions/{sid}/read", {"seq": "5"}, "seq"),
        (f"{API}/sessions/{sid}/read", {"seq": 1.5}, "seq"),
        (f"{API}/sessions/{sid}/read", {"seq": True}, "seq"),
        (f"{API}/sessions/{sid}/read", {}, "seq"),
        (f"{API}/sessions/{sid}/messages", {"content": 5}, "content"),
        (f"{API}/sessions/{sid}/messages", {"content": None}, "content"),
        (f"{API}/sessions/{sid}/messages", {"content": ["a"]}, "content"),
        (f"{API}/sessions/{sid}/messages", {}, "content"),
        (f"{API}/sessions/{sid}/messages", {"content": "x", "metadata": "m"}, "metadata"),
        (f"{API}/sessions/{sid}/messages", {"content": "x", "client_msg_id": 7}, "client_msg_id"),
        (f"{API}/sessions/{sid}/messages", {"content": "x", "client_msg_id": ""}, "client_msg_id"),
        (
            f"{API}/sessions/{sid}/messages",
            {"content": "x", "client_msg_id": "c" * 101},
            "client_msg_id",
        ),
        (f"{API}/sessions/{sid}/messages", {"content": "x", "message_type": 1}, "message_type"),
        (
            f"{API}/sessions/{sid}/messages",
            {"content": "x", "message_type": "stream"},
            "message_type",
        ),
        (f"{API}/sessions", {"participants": bob.id}, "participants"),
        (f"{API}/sessions", {"participants": {"id": bob.id}}, "participants"),
        (f"{API}/sessions", {"participants": [1, 2]}, "participants"),
        (f"{API}/sessions", {"agent_id": "1"}, "agent_id"),
        (f"{API}/sessions", {"title": 5}, "title"),
        (f"{API}/sessions", {"title": "t" * 201}, "title"),
        (f"{API}/sessions", {"metadata": [1]}, "metadata"),
        (f"{API}/sessions", {"kind": "channel"}, "kind"),
        (f"{API}/sessions", {"scheduled_at": "tomorrow"}, "scheduled_at"),
    ]
    for path, body, field in cases:
        response = await http.post(path, headers=alice.headers, json=body)
        error = assert_error(response, 422, "VALIDATION_ERROR")
        assert field in error["message"], (body, error)
    assert (await alice.client.list_messages(sid))["total"] == 1
    assert (await alice.client.list_sessions())["total"] == 1
    await assert_server_works(server.base_url, tokens)


async def test_oversized_metadata_is_413(
    http: httpx.AsyncClient,
    room: tuple[User, User, str],
    server: ServerProcess,
    tokens: TokenCodec,
) -> None:
    alice, _, sid = room
    big = {"blob": "m" * 20_000}
    response = await http.post(
        f"{API}/sessions/{sid}/messages",
        headers=alice.headers,
        json={"content": "x", "metadata": big},
    )
    assert_error(response, 413, "CONTENT_TOO_LARGE")
    response = await http.post(
        f"{API}/sessions", headers=alice.headers, json={"title": "t", "metadata": big}
    )
    assert_error(response, 413, "CONTENT_TOO_LARGE")
    assert (await alice.client.list_messages(sid))["total"] == 1
    await assert_server_works(server.base_url, tokens)


async def test_empty_content_is_rejected(
    http: httpx.AsyncClient, room: tuple[User, User, str], server: ServerProcess, tokens: TokenCodec
) -> None:
    alice, _, sid = room
    for content in ("", "   ", "\n\t "):
        response = await http.post(
            f"{API}/sessions/{sid}/messages", headers=alice.headers, json={"content": content}
        )
        assert_error(response, 422, "EMPTY_CONTENT")
    assert (await alice.client.list_messages(sid))["total"] == 1
    await assert_server_works(server.base_url, tokens)


async def test_bad_session_requests(
    http: httpx.AsyncClient, users: Users, server: ServerProcess, tokens: TokenCodec
) -> None:
    alice, bob, carol = users("alice"), users("bob"), users("carol")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"kind": "direct", "participants": []}, "VALIDATION_ERROR"),
        ({"kind": "direct", "participants": [alice.id]}, "VALIDATION_ERROR"),  # only myself
        ({"kind": "direct", "participants": [bob.id, carol.id]}, "VALIDATION_ERROR"),
        ({"kind": "agent"}, "VALIDATION_ERROR"),  # an agent session needs an agent
        ({"kind": "group", "agent_id": 1}, "VALIDATION_ERROR"),
        ({"agent_id": 999_999}, "UNKNOWN_AGENT"),
        ({"participants": [""]}, "VALIDATION_ERROR"),
        ({"participants": ["u" * 101]}, "VALIDATION_ERROR"),
    ]
    for body, code in cases:
        response = await http.post(f"{API}/sessions", headers=alice.headers, json=body)
        assert_error(response, 422, code)
    assert (await alice.client.list_sessions())["total"] == 0
    assert (await bob.client.list_sessions())["total"] == 0
    await assert_server_works(server.base_url, tokens)


async def test_bad_query_parameters(
    http: httpx.AsyncClient, room: tuple[User, User, str], server: ServerProcess, tokens: TokenCodec
) -> None:
    alice, _, sid = room
    messages = f"{API}/sessions/{sid}/messages"
    for params in (
        {"limit": 0},
        {"limit": 1000},
        {"limit": 201},
        {"limit": -1},
        {"limit": "ten"},
        {"before": "yesterday"},
        {"after": "2025-13-45T99:00:00Z"},
        {"before": "-1"},
        {"after": "1.5"},
        {"before": "²"},
        {"after": "x" * 65},
    ):
        response = await http.get(messages, headers=alice.headers, params=params)
        assert_error(response, 422, "VALIDATION_ERROR")
    sessions = f"{API}/sessions"
    for params in (
        {"limit": 0},
        {"limit": 1000},
        {"offset": -1},
        {"status": "deleted"},
        {"status": "bogus"},
        {"agent_id": "one"},
    ):
        response = await http.get(sessions, headers=alice.headers, params=params)
        assert_error(response, 422, "VALIDATION_ERROR")
    # Limits at the edges are fine.
    ok = await http.get(messages, headers=alice.headers, params={"limit": 200})
    assert ok.status_code == 200 and ok.json()["total"] == 1
    ok = await http.get(messages, headers=alice.headers, params={"limit": 1})
    assert ok.status_code == 200 and len(ok.json()["messages"]) == 1
    await assert_server_works(server.base_url, tokens)


async def test_negative_read_seq_and_unknown_ids(
    http: httpx.AsyncClient, room: tuple[User, User, str], server: ServerProcess, tokens: TokenCodec
) -> None:
    alice, _, sid = room
    response = await http.post(
        f"{API}/sessions/{sid}/read", headers=alice.headers, json={"seq": -1}
    )
    assert_error(response, 422, "VALIDATION_ERROR")
    for path in (f"{API}/sessions/sess_nope", f"{API}/sessions/{sid}x/messages"):
        assert_error(await http.get(path, headers=alice.headers), 404, "SESSION_NOT_FOUND")
    response = await http.get(f"{API}/sessions/{'s' * 101}", headers=alice.headers)
    assert response.status_code in (404, 422)
    assert_error(response, response.status_code, "SESSION_NOT_FOUND", "VALIDATION_ERROR")
    assert_error(await http.get("/api/chat/nothing-here", headers=alice.headers), 404, "NOT_FOUND")
    response = await http.put(f"{API}/sessions/{sid}", headers=alice.headers, json={})
    assert_error(response, 405, "METHOD_NOT_ALLOWED")
    await assert_server_works(server.base_url, tokens)


async def test_request_body_over_the_default_limit_is_413(
    http: httpx.AsyncClient, room: tuple[User, User, str], server: ServerProcess, tokens: TokenCodec
) -> None:
    alice, _, sid = room
    huge = {"content": "x" * 2_000_000}
    response = await http.post(f"{API}/sessions/{sid}/messages", headers=alice.headers, json=huge)
    assert_error(response, 413, "CONTENT_TOO_LARGE")
    assert (await alice.client.list_messages(sid))["total"] == 1
    await assert_server_works(server.base_url, tokens)


async def test_small_limits_oversized_content_and_body(
    small_server: ServerProcess, small_users: Users, tokens: TokenCodec
) -> None:
    alice = small_users("alice")
    sid = (await alice.client.create_session(title="limits"))["session_id"]
    url = f"{API}/sessions/{sid}/messages"
    async with httpx.AsyncClient(base_url=small_server.base_url, headers=alice.headers) as http:
        # Exactly at the limit is accepted; one byte more is not.
        at_limit = await http.post(url, json={"content": "a" * SMALL_FRAME_LIMIT})
        assert at_limit.status_code == 201, at_limit.text
        over = await http.post(url, json={"content": "a" * (SMALL_FRAME_LIMIT + 1)})
        assert_error(over, 413, "CONTENT_TOO_LARGE")
        # The limit is in bytes: 342 three-byte characters are 1026 bytes.
        korean = await http.post(url, json={"content": "한" * 342})
        assert_error(korean, 413, "CONTENT_TOO_LARGE")

        # A body over MAX_REQUEST_BODY, declared with Content-Length …
        body = json.dumps({"content": "b" * SMALL_BODY_LIMIT}).encode()
        declared = await http.post(url, content=body, headers={"content-type": "application/json"})
        assert_error(declared, 413, "CONTENT_TOO_LARGE")

        # … or streamed in chunks without a length.
        async def chunks() -> AsyncIterator[bytes]:
            yield b'{"content": "'
            for _ in range(8):
                yield b"c" * 1024
            yield b'"}'

        streamed = await http.post(
            url, content=chunks(), headers={"content-type": "application/json"}
        )
        assert "content-length" not in streamed.request.headers
        assert_error(streamed, 413, "CONTENT_TOO_LARGE")

        page = await http.get(url)
        assert [m["content"] for m in page.json()["messages"]] == ["a" * SMALL_FRAME_LIMIT]
    await assert_server_works(small_server.base_url, tokens)


# -- WebSocket ------------------------------------------------------------------------------

# (frame to send, error code expected). Text frames unless bytes.
WS_CASES: list[tuple[str | bytes, str]] = [
    ("not json", "BAD_JSON"),
    ("{'type': 'message'}", "BAD_JSON"),
    ('{"type": "message", "content": "x"', "BAD_JSON"),
    ("", "BAD_JSON"),
    ('[{"type": "ping"}]', "BAD_FRAME"),
    ("42", "BAD_FRAME"),
    ("null", "BAD_FRAME"),
    ('"ping"', "BAD_FRAME"),
    (b'{"type": "ping"}', "BAD_FRAME"),
    (b"\x00\x01\x02", "BAD_FRAME"),
    ('{"type": "bogus"}', "UNKNOWN_TYPE"),
    ('{"content": "no type"}', "UNKNOWN_TYPE"),
    ('{"type": 5}', "UNKNOWN_TYPE"),
    ('{"type": null}', "UNKNOWN_TYPE"),
    ('{"type": "pong"}', "UNKNOWN_TYPE"),
    ('{"type": "message"}', "VALIDATION_ERROR"),
    ('{"type": "message", "content": 5}', "VALIDATION_ERROR"),
    ('{"type": "message", "content": null}', "VALIDATION_ERROR"),
    ('{"type": "message", "content": "x", "metadata": "m"}', "VALIDATION_ERROR"),
    ('{"type": "message", "content": "x", "client_msg_id": ""}', "VALIDATION_ERROR"),
    ('{"type": "message", "content": "x", "client_msg_id": 12}', "VALIDATION_ERROR"),
    ('{"type": "typing"}', "VALIDATION_ERROR"),
    ('{"type": "typing", "is_typing": "yes"}', "VALIDATION_ERROR"),
    ('{"type": "read", "seq": "5"}', "VALIDATION_ERROR"),
    ('{"type": "read", "seq": -1}', "VALIDATION_ERROR"),
    ('{"type": "read"}', "VALIDATION_ERROR"),
    ('{"type": "message", "content": ""}', "EMPTY_CONTENT"),
    ('{"type": "message", "content": "  \\n "}', "EMPTY_CONTENT"),
]


async def _assert_still_chats(ws: ClientConnection, other: ClientConnection) -> None:
    """The same connection sends and receives a message, and the other side gets it."""
    cid = uuid.uuid4().hex
    echo = await send_and_echo(ws, "still here", cid)
    assert echo["content"] == "still here"
    got = await recv_until(other, "message")
    assert got["client_msg_id"] == cid


@pytest.mark.parametrize(
    ("frame", "code"), WS_CASES, ids=[f"{c}-{i}" for i, (_, c) in enumerate(WS_CASES)]
)
async def test_ws_bad_frame_gets_error_and_connection_survives(
    server: ServerProcess, room: tuple[User, User, str], frame: str | bytes, code: str
) -> None:
    alice, bob, sid = room
    ws = await ws_connect(server, sid, alice.token)
    other = await ws_connect(server, sid, bob.token)
    try:
        await frames_until_pong(ws)
        await frames_until_pong(other)
        await ws.send(frame)
        error = await recv_until(ws, "error")
        assert error["code"] == code, error
        assert isinstance(error["message"], str) and error["message"]
        await _assert_still_chats(ws, other)
    finally:
        await ws.close()
        await other.close()
    assert [m["content"] for m in await alice.client.history(sid)] == ["before", "still here"]


async def test_ws_error_for_a_message_names_its_client_msg_id(
    server: ServerProcess, room: tuple[User, User, str]
) -> None:
    alice, _, sid = room
    ws = await ws_connect(server, sid, alice.token)
    try:
        await ws.send(json.dumps({"type": "message", "content": " ", "client_msg_id": "mine-1"}))
        error = await recv_until(ws, "error")
        assert error["code"] == "EMPTY_CONTENT"
        assert error["client_msg_id"] == "mine-1"
    finally:
        await ws.close()


async def test_ws_bad_since_seq_is_refused(
    server: ServerProcess, room: tuple[User, User, str], tokens: TokenCodec
) -> None:
    alice, _, sid = room
    codes: dict[str, int | None] = {}
    for since in ("abc", "-1", "1.5", "", "0x10"):
        ws = await ws_connect(server, sid, alice.token, since_seq=since)
        try:
            codes[since] = await close_code(ws)
        finally:
            await ws.close()
    assert codes == dict.fromkeys(codes, 4400)
    await assert_server_works(server.base_url, tokens)


async def test_ws_since_seq_that_only_looks_like_a_digit_is_refused(
    server: ServerProcess, room: tuple[User, User, str]
) -> None:
    """since_seq="²" passes str.isdigit() but int() rejects it: it is a bad since_seq
    (4400), not a crash of the handler (which the client sees as an abnormal close)."""
    alice, _, sid = room
    ws = await ws_connect(server, sid, alice.token, since_seq="²")
    try:
        assert await close_code(ws) == 4400
    finally:
        await ws.close()


async def test_ws_oversized_frames_on_small_server(
    small_server: ServerProcess, small_users: Users
) -> None:
    alice, bob = small_users("alice"), small_users("bob")
    sid = (await alice.client.create_session(title="frames", participants=[bob.id]))["session_id"]
    ws = await ws_connect(small_server, sid, alice.token)
    other = await ws_connect(small_server, sid, bob.token)
    try:
        await frames_until_pong(other)
        # The limit is on the whole frame: content under 1024 bytes in a frame over it.
        big_message = json.dumps({"type": "message", "content": "z" * (SMALL_FRAME_LIMIT - 10)})
        assert len(big_message) > SMALL_FRAME_LIMIT
        for frame in (big_message, "x" * (SMALL_FRAME_LIMIT + 1), "한" * 400):
            await ws.send(frame)
            error = await recv_until(ws, "error")
            assert error["code"] == "FRAME_TOO_LARGE", error
        # A frame just under the limit is a message.
        fits = {"type": "message", "content": "", "client_msg_id": "fits"}
        fits["content"] = "y" * (SMALL_FRAME_LIMIT - len(json.dumps(fits)))
        await ws.send(json.dumps(fits))
        echo = await recv_until(ws, "message")
        assert echo["client_msg_id"] == "fits"
        assert len(json.dumps(fits)) == SMALL_FRAME_LIMIT
        assert (await recv_until(other, "message"))["client_msg_id"] == "fits"
        await _assert_still_chats(ws, other)
        # Bob saw two messages and none of alice's errors.
        assert [f["type"] for f in await frames_until_pong(other)] == []
    finally:
        await ws.close()
        await other.close()
    history = await alice.client.history(sid)
    assert [m["client_msg_id"] is not None for m in history] == [True, True]


async def test_ws_frame_over_the_hard_limit_closes_with_1009(
    small_server: ServerProcess, small_users: Users
) -> None:
    """Past 4 x WS_MESSAGE_SIZE_LIMIT (at least 1 MiB) the frame is not even read."""
    alice = small_users("alice")
    sid = (await alice.client.create_session(title="huge"))["session_id"]
    ws = await ws_connect(small_server, sid, alice.token, max_size=None)
    try:
        await frames_until_pong(ws)
        await ws.send("h" * (1_048_576 + 1))
        assert await close_code(ws) == 1009
    finally:
        await ws.close()
    # Nothing else is affected.
    async with alice.client.realtime(sid) as live:
        await live.send_message("fine")
        assert (await live.receive_until("message"))["content"] == "fine"


async def test_hostile_client_does_not_disturb_others(server: ServerProcess, users: Users) -> None:
    alice, bob, mallory = users("alice"), users("bob"), users("mallory")
    sid = (await alice.client.create_session(title="room", participants=[bob.id, mallory.id]))[
        "session_id"
    ]
    async with alice.client.realtime(sid) as live_a, bob.client.realtime(sid) as live_b:
        hostile = await ws_connect(server, sid, mallory.token)
        try:
            garbage = [frame for frame, _ in WS_CASES] * 3

            async def spray() -> int:
                for frame in garbage:
                    await hostile.send(frame)
                errors = 0
                while errors < len(garbage):
                    if (await recv_json(hostile, 10))["type"] == "error":
                        errors += 1
                return errors

            async def talk() -> list[str]:
                sent = []
                for i in range(20):
                    sent.append(await live_a.send_message(f"normal {i}"))
                    await asyncio.sleep(0)
                return sent

            errors, sent = await asyncio.gather(spray(), talk())
            assert errors == len(garbage)

            # Bob gets all 20 messages in order, and nothing about mallory's garbage.
            got: list[dict[str, Any]] = []
            while len(got) < 20:
                frame = await live_b.receive(10)
                assert frame["type"] not in ("error",), frame
                if frame["type"] == "message":
                    got.append(frame)
            assert [f["client_msg_id"] for f in got] == sent
            assert [f["seq"] for f in got] == list(range(1, 21))
            await live_b.ping()
            rest = []
            while (frame := await live_b.receive(5))["type"] != "pong":
                rest.append(frame)
            assert [f for f in rest if f["type"] in ("error", "message")] == []
            # Alice got her own 20 messages back, with no error among them.
            echoes: list[dict[str, Any]] = []
            while len(echoes) < 20:
                frame = await live_a.receive(10)
                assert frame["type"] != "error", frame
                if frame["type"] == "message":
                    echoes.append(frame)
            assert [f["client_msg_id"] for f in echoes] == sent
            # Mallory's connection still works too.
            await send_and_echo(hostile, "sorry", "m-1")
        finally:
            await hostile.close()
    history = await alice.client.history(sid)
    assert len(history) == 21
