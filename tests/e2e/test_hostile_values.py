"""Hostile values get a 4xx (or an `error` frame), never a 500, on SQLite and PostgreSQL.

Lone surrogates, NUL characters, integers past 64 bits and NaN/Infinity, sent where a
client controls text or numbers: REST bodies, paths, queries, WebSocket frames, form
fields and token claims. After every refusal the same keep-alive connection keeps working.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import jwt
import pytest
import websockets

from chatservice.auth import TokenCodec
from tests.conftest import TEST_SECRET, ServerProcess, new_user
from tests.e2e.conftest import bearer, frames_until_pong, recv_until, send_and_echo, ws_url

API = "/api/chat"
BIG = 2**63 + 5  # past every BIGINT (and parsed as an integer, not a float)
WIDE = 2**40  # fits 64 bits, not the 32-bit INTEGER columns of ids and seqs
JSON = dict[str, Any]


async def a_session(http: httpx.AsyncClient, headers: dict[str, str]) -> str:
    created = await http.post(f"{API}/sessions", json={"title": "t"}, headers=headers)
    assert created.status_code == 201, created.text
    return str(created.json()["session_id"])


def assert_refused(response: httpx.Response, status: int = 422) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.json()["error"]["code"], response.text
    assert "Traceback" not in response.text and "sqlalchemy" not in response.text.lower()


RAW_BODIES = [
    # (what, raw JSON text of a message body)
    ("lone surrogate in content", '{"content": "a\\ud800b"}'),
    ("lone low surrogate", '{"content": "\\udc00"}'),
    ("NUL in content", '{"content": "a\\u0000b"}'),
    ("NUL in client_msg_id", '{"content": "x", "client_msg_id": "c\\u0000"}'),
    ("NUL in a metadata key", '{"content": "x", "metadata": {"k\\u0000": 1}}'),
    ("NUL deep in metadata", '{"content": "x", "metadata": {"a": [{"b": "\\u0000"}]}}'),
    ("surrogate in metadata", '{"content": "x", "metadata": {"a": "\\ud83d"}}'),
    ("integer past 64 bits", f'{{"content": "x", "metadata": {{"n": {BIG}}}}}'),
    ("NaN", '{"content": "x", "metadata": {"n": NaN}}'),
    ("Infinity", '{"content": "x", "metadata": {"n": Infinity}}'),
    ("overflowing float", '{"content": "x", "metadata": {"n": 1e999}}'),
    ("nested too deep", '{"content": "x", "metadata": ' + '{"a": ' * 40 + "1" + "}" * 41),
]


@pytest.mark.parametrize(("what", "raw"), RAW_BODIES, ids=[w for w, _ in RAW_BODIES])
async def test_hostile_message_bodies_are_refused(
    server: ServerProcess, tokens: TokenCodec, what: str, raw: str
) -> None:
    headers = bearer(tokens.issue(new_user("hostile")))
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(base_url=server.base_url, limits=limits, timeout=10) as http:
        sid = await a_session(http, headers)
        for _ in range(3):
            refused = await http.post(
                f"{API}/sessions/{sid}/messages",
                content=raw.encode(),
                headers={**headers, "Content-Type": "application/json"},
            )
            assert_refused(refused)
            # The keep-alive connection is still good for the next request.
            page = await http.get(f"{API}/sessions/{sid}/messages", headers=headers)
            assert page.status_code == 200 and page.json()["messages"] == []


async def test_hostile_values_in_other_bodies(server: ServerProcess, tokens: TokenCodec) -> None:
    headers = bearer(tokens.issue(new_user("hostile")))
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
        sid = await a_session(http, headers)
        cases: list[tuple[str, str, str]] = [
            ("POST", f"{API}/sessions", '{"title": "a\\u0000"}'),
            ("POST", f"{API}/sessions", '{"title": "\\ud800"}'),
            ("POST", f"{API}/sessions", f'{{"agent_id": {BIG}}}'),
            ("POST", f"{API}/sessions", f'{{"agent_id": {WIDE}}}'),
            ("POST", f"{API}/sessions", '{"participants": ["bob\\u0000"]}'),
            ("POST", f"{API}/sessions", '{"metadata": {"x": NaN}}'),
            ("POST", f"{API}/sessions/{sid}/read", f'{{"seq": {BIG}}}'),
            ("POST", f"{API}/sessions/{sid}/participants", '{"user_ids": ["\\u0000"]}'),
            ("POST", f"{API}/sessions/{sid}/messages/stream", '{"content": "\\ud800"}'),
        ]
        for method, path, raw in cases:
            response = await http.request(
                method,
                path,
                content=raw.encode(),
                headers={**headers, "Content-Type": "application/json"},
            )
            assert_refused(response)
        created = await http.post(f"{API}/sessions", json={"title": "fine"}, headers=headers)
        assert created.status_code == 201


@pytest.mark.parametrize(
    "path",
    [
        f"{API}/sessions?offset={BIG}",
        f"{API}/sessions?agent_id={BIG}",
        f"{API}/sessions?agent_id=-{BIG}",
        f"{API}/sessions?agent_id={WIDE}",
        f"{API}/sessions?status=a%00b",
        f"{API}/sessions/sess_x%00y",
        f"{API}/sessions/sess_x%00y/messages",
        f"{API}/sessions/SID/messages?before={BIG}",
        f"{API}/sessions/SID/messages?after={BIG}",
        f"{API}/sessions/SID/messages?after=1%00",
        f"{API}/streams/msg_%00?from_index=0",
        f"{API}/streams/msg_x?from_index={BIG}",
        "/files/file_%00",
        "/files/file_%00/thumb",
    ],
)
async def test_hostile_paths_and_queries(
    server: ServerProcess, tokens: TokenCodec, path: str
) -> None:
    headers = bearer(tokens.issue(new_user("hostile")))
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
        sid = await a_session(http, headers)
        response = await http.get(path.replace("SID", sid), headers=headers)
        assert 400 <= response.status_code < 500, (response.status_code, response.text)
        ok = await http.get(f"{API}/sessions", headers=headers)
        assert ok.status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        f"{API}/sessions?offset={WIDE}",
        f"{API}/sessions/SID/messages?before={WIDE}",
        f"{API}/sessions/SID/messages?after={WIDE}",
        f"{API}/streams/msg_x?from_index={WIDE}",
    ],
)
async def test_wide_but_64_bit_numbers_are_answered(
    server: ServerProcess, tokens: TokenCodec, path: str
) -> None:
    """Numbers past the 32-bit columns but within 64 bits are valid requests: they page past
    everything (or find nothing), on both databases."""
    headers = bearer(tokens.issue(new_user("wide")))
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
        sid = await a_session(http, headers)
        response = await http.get(path.replace("SID", sid), headers=headers)
        assert response.status_code in (200, 404), (response.status_code, response.text)


def forged(claims: JSON) -> str:
    return jwt.encode(claims, TEST_SECRET, algorithm="HS256")


@pytest.mark.parametrize(
    "claims",
    [
        {"sub": "a\x00b"},
        {"sub": "bell\x07"},
        {"sub": " padded "},
        {"sub": ""},
        {"sub": 42},
        {"sub": "x" * 101},
        {"sub": "ok", "exp": "9999999999"},
        {"sub": "ok", "exp": True},
        {"sub": "ok", "iat": "yesterday"},
        {"sub": "ok", "nbf": "0"},
    ],
    ids=lambda c: repr(c)[:40],
)
async def test_tokens_with_insane_claims_are_refused(server: ServerProcess, claims: JSON) -> None:
    full = {"exp": int(time.time()) + 600, **claims}
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
        response = await http.get(f"{API}/sessions", headers=bearer(forged(full)))
        assert response.status_code == 401, response.text
        message = response.json()["error"]["message"]
        # Our words, not the JWT library's.
        for internal in ("jwt", "PyJWT", "Decode", "Traceback", "must be an integer"):
            assert internal not in message, message


async def test_refusals_over_websocket_leave_the_socket_open(
    server: ServerProcess, tokens: TokenCodec
) -> None:
    user = new_user("hostile")
    token = tokens.issue(user)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
        sid = await a_session(http, bearer(token))
    async with websockets.connect(ws_url(server, sid, token)) as ws:
        await frames_until_pong(ws)
        frames = [
            '{"type": "message", "content": "a\\u0000b"}',
            '{"type": "message", "content": "x", "metadata": {"n": ' + str(BIG) + "}}",
            '{"type": "read", "seq": ' + str(BIG) + "}",
            '{"type": "message", "content": "\\ud800"}',
            '{"type": "cancel", "message_id": "msg_\\u0000"}',
            '{"type": "file", "file_id": "file_\\u0000"}',
            '{"type": "message", "content": "x", "metadata": {"n": NaN}}',
        ]
        for raw in frames:
            await ws.send(raw)
            error = await recv_until(ws, "error")
            assert error["code"] in ("VALIDATION_ERROR", "BAD_JSON"), error
        # Within 64 bits it is a valid read receipt: clamped to the session's last seq.
        await ws.send('{"type": "read", "seq": ' + str(WIDE) + "}")
        assert not [f for f in await frames_until_pong(ws) if f.get("type") == "error"]
        echoed = await send_and_echo(ws, "still here", "cid-ok")
        assert echoed["seq"] == 1
    # A NUL in the session id of the path closes with 4404, like any unknown session.
    async with websockets.connect(ws_url(server, "sess_a%00b", token)) as ws:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4404


async def test_upload_form_fields_are_checked(server: ServerProcess, tokens: TokenCodec) -> None:
    headers = bearer(tokens.issue(new_user("hostile")))
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
        sid = await a_session(http, headers)
        for field in ("message", "client_msg_id"):
            response = await http.post(
                f"{API}/sessions/{sid}/files",
                files={"file": ("a.txt", b"hello", "text/plain")},
                data={field: "bad\x00value"},
                headers=headers,
            )
            assert_refused(response)


async def test_every_answer_carries_nosniff_and_a_cache_policy(
    server: ServerProcess, tokens: TokenCodec
) -> None:
    headers = bearer(tokens.issue(new_user("headers")))
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
        for response in (
            await http.get(f"{API}/sessions", headers=headers),
            await http.get(f"{API}/sessions"),  # 401
            await http.get(f"{API}/sessions/sess_nope", headers=headers),  # 404
            await http.get("/healthz"),
        ):
            assert response.headers["x-content-type-options"] == "nosniff"
            assert response.headers["cache-control"] == "no-store"
