"""Per-user rate limits end to end (RATE_LIMIT_ENABLED, RATE_LIMIT_MESSAGES_PER_MINUTE=5).

Run on a single instance with the memory bus (SQLite), on a single instance with Redis
(PostgreSQL), and on two instances sharing PostgreSQL and Redis. Over the limit: HTTP 429
with `Retry-After` (whole seconds) and `retry_after` (ms) in the body; WebSocket `error`
frame RATE_LIMIT with `retry_after`; the connection stays open; nothing is stored.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from chatservice.auth import TokenCodec
from tests.conftest import ServerProcess, new_user, start_server
from tests.e2e.conftest import bearer, frames_until_pong, recv_until, send_and_echo, ws_connect

API = "/api/chat"
LIMIT = 5
INTERVAL_MS = 60_000 // LIMIT  # one send fits again every 12 s
LIMITED = {"RATE_LIMIT_ENABLED": "true", "RATE_LIMIT_MESSAGES_PER_MINUTE": LIMIT}
JSON = dict[str, Any]


@pytest.fixture(scope="module", params=["memory", "redis"])
def limited(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """One rate-limited instance: memory bus on SQLite, or Redis on PostgreSQL."""
    if request.param == "memory":
        proc = start_server(tmp_path_factory.mktemp("limited-memory"), None, **LIMITED)
    else:
        proc = start_server(
            tmp_path_factory.mktemp("limited-redis"),
            request.getfixturevalue("postgres_url"),
            REDIS_URL=request.getfixturevalue("redis_url"),
            **LIMITED,
        )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def pair(
    tmp_path_factory: pytest.TempPathFactory, postgres_url: str, redis_url: str
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Two rate-limited instances sharing PostgreSQL and Redis."""
    base = tmp_path_factory.mktemp("limited-pair")
    one = start_server(base / "one", postgres_url, REDIS_URL=redis_url, **LIMITED)
    try:
        two = start_server(base / "two", postgres_url, REDIS_URL=redis_url, **LIMITED)
    except BaseException:
        one.stop()
        raise
    yield one, two
    two.stop()
    one.stop()


class Person:
    """A fresh user with an HTTP client on one instance."""

    def __init__(self, tokens: TokenCodec, prefix: str) -> None:
        self.id = new_user(prefix)
        self.token = tokens.issue(self.id)

    def on(self, server: ServerProcess) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=server.base_url, headers=bearer(self.token), timeout=10)


@pytest.fixture
async def clients() -> AsyncIterator[list[httpx.AsyncClient]]:
    """Collects the clients a test opens, closing them afterwards."""
    made: list[httpx.AsyncClient] = []
    yield made
    for client in made:
        await client.aclose()


def person(
    tokens: TokenCodec, prefix: str, *servers: ServerProcess, into: list[httpx.AsyncClient]
) -> tuple[Person, list[httpx.AsyncClient]]:
    who = Person(tokens, prefix)
    opened = [who.on(s) for s in servers]
    into.extend(opened)
    return who, opened


async def new_session(http: httpx.AsyncClient, *members: str) -> str:
    created = await http.post(
        f"{API}/sessions", json={"title": "rate limit", "participants": list(members)}
    )
    assert created.status_code == 201, created.text
    return str(created.json()["session_id"])


async def post(http: httpx.AsyncClient, sid: str, content: str) -> httpx.Response:
    return await http.post(f"{API}/sessions/{sid}/messages", json={"content": content})


async def stored(http: httpx.AsyncClient, sid: str) -> list[str]:
    page = await http.get(f"{API}/sessions/{sid}/messages", params={"limit": 200})
    assert page.status_code == 200, page.text
    return [m["content"] for m in page.json()["messages"]]


def assert_rate_limited(response: httpx.Response) -> int:
    """A proper 429; returns its retry_after (ms)."""
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert error["code"] == "RATE_LIMIT"
    assert error["message"]
    retry_after = error["retry_after"]
    assert isinstance(retry_after, int)
    assert 0 < retry_after <= INTERVAL_MS
    assert response.headers["Retry-After"] == str(math.ceil(retry_after / 1000))
    return retry_after


# -- one instance: memory bus, and Redis ------------------------------------------------------


async def test_rest_send_over_the_limit_is_429_and_not_stored(
    limited: ServerProcess, tokens: TokenCodec, clients: list[httpx.AsyncClient]
) -> None:
    _, [http] = person(tokens, "alice", limited, into=clients)
    sid = await new_session(http)
    for i in range(1, LIMIT + 1):
        sent = await post(http, sid, f"m{i}")
        assert sent.status_code == 201, (i, sent.text)
    over = await post(http, sid, "one too many")
    retry_after = assert_rate_limited(over)
    # The whole burst was just spent: the next slot is about a full interval away.
    assert retry_after > INTERVAL_MS - 5_000
    assert over.headers["Retry-After"] in ("11", "12")
    assert await stored(http, sid) == [f"m{i}" for i in range(1, LIMIT + 1)]
    # Still over the limit: refused again, still not stored, and nothing else broke.
    assert_rate_limited(await post(http, sid, "and another"))
    assert len(await stored(http, sid)) == LIMIT
    assert (await http.get(f"{API}/sessions/{sid}")).status_code == 200


async def test_ws_send_over_the_limit_is_an_error_frame_and_the_socket_stays_usable(
    limited: ServerProcess, tokens: TokenCodec, clients: list[httpx.AsyncClient]
) -> None:
    alice, [http] = person(tokens, "alice", limited, into=clients)
    bob, [bob_http] = person(tokens, "bob", limited, into=clients)
    sid = await new_session(http, bob.id)
    ws = await ws_connect(limited, sid, alice.token)
    try:
        await recv_until(ws, "connected")
        for i in range(1, LIMIT + 1):
            echo = await send_and_echo(ws, f"w{i}", f"c{i}")
            assert echo["seq"] == i
        await ws.send(json.dumps({"type": "message", "content": "too many", "client_msg_id": "c6"}))
        error = await recv_until(ws, "error")
        assert error["code"] == "RATE_LIMIT", error
        assert error["message"]
        assert isinstance(error["retry_after"], int)
        assert INTERVAL_MS - 5_000 < error["retry_after"] <= INTERVAL_MS
        assert error.get("client_msg_id") == "c6"

        # The socket is still open and usable: it answers pings, reports a second
        # refusal, and still delivers other people's messages.
        await ws.send(json.dumps({"type": "message", "content": "again", "client_msg_id": "c7"}))
        frames = await frames_until_pong(ws)
        assert [f["code"] for f in frames if f.get("type") == "error"] == ["RATE_LIMIT"]
        assert not [f for f in frames if f.get("type") == "message"], frames
        assert (await post(bob_http, sid, "from bob")).status_code == 201
        delivered = await recv_until(ws, "message")
        assert (delivered["content"], delivered["sender_id"], delivered["seq"]) == (
            "from bob",
            bob.id,
            LIMIT + 1,
        )
    finally:
        await ws.close()
    assert await stored(http, sid) == [f"w{i}" for i in range(1, LIMIT + 1)] + ["from bob"]


async def test_the_budget_is_per_user_across_sessions_and_transports(
    limited: ServerProcess, tokens: TokenCodec, clients: list[httpx.AsyncClient]
) -> None:
    alice, [http] = person(tokens, "alice", limited, into=clients)
    bob, [bob_http] = person(tokens, "bob", limited, into=clients)
    first, second = await new_session(http, bob.id), await new_session(http)
    for i in range(3):
        assert (await post(http, first, f"first {i}")).status_code == 201
    ws = await ws_connect(limited, second, alice.token)
    try:
        await recv_until(ws, "connected")
        await send_and_echo(ws, "second 0", "s0")
        await send_and_echo(ws, "second 1", "s1")
        # Sixth send of the minute, in a third place: refused.
        assert_rate_limited(await post(http, first, "first 3"))
        await ws.send(json.dumps({"type": "message", "content": "no", "client_msg_id": "s2"}))
        assert (await recv_until(ws, "error"))["code"] == "RATE_LIMIT"
    finally:
        await ws.close()
    assert await stored(http, first) == ["first 0", "first 1", "first 2"]
    assert await stored(http, second) == ["second 0", "second 1"]

    # Bob, in the same session, has his own full budget.
    for i in range(LIMIT):
        sent = await post(bob_http, first, f"bob {i}")
        assert sent.status_code == 201, (i, sent.text)
    assert_rate_limited(await post(bob_http, first, "bob over"))
    assert len(await stored(http, first)) == 3 + LIMIT


async def test_limits_are_off_unless_enabled(
    server: ServerProcess, tokens: TokenCodec, clients: list[httpx.AsyncClient]
) -> None:
    """The shared test server runs without RATE_LIMIT_ENABLED: no budget at all."""
    _, [http] = person(tokens, "free", server, into=clients)
    sid = await new_session(http)
    for i in range(3 * LIMIT):
        sent = await post(http, sid, f"m{i}")
        assert sent.status_code == 201, (i, sent.text)


# -- two instances sharing Redis ---------------------------------------------------------------


@pytest.mark.parametrize("sixth_on", [0, 1])
async def test_two_instances_share_one_budget(
    pair: tuple[ServerProcess, ServerProcess],
    tokens: TokenCodec,
    clients: list[httpx.AsyncClient],
    sixth_on: int,
) -> None:
    _, https = person(tokens, "alice", *pair, into=clients)
    sid = await new_session(https[0])
    for i in range(LIMIT):  # spread over both instances: 0, 1, 0, 1, 0
        sent = await post(https[i % 2], sid, f"m{i}")
        assert sent.status_code == 201, (i, sent.text)
    # The sixth send overall is refused whichever instance takes it, and so is a seventh
    # on the other one.
    assert_rate_limited(await post(https[sixth_on], sid, "sixth"))
    assert_rate_limited(await post(https[1 - sixth_on], sid, "seventh"))
    expected = [f"m{i}" for i in range(LIMIT)]
    assert await stored(https[0], sid) == expected
    assert await stored(https[1], sid) == expected


async def test_two_instances_share_one_budget_over_websockets(
    pair: tuple[ServerProcess, ServerProcess],
    tokens: TokenCodec,
    clients: list[httpx.AsyncClient],
) -> None:
    alice, https = person(tokens, "alice", *pair, into=clients)
    sid = await new_session(https[0])
    sockets = [await ws_connect(server, sid, alice.token) for server in pair]
    try:
        for ws in sockets:
            await recv_until(ws, "connected")
        for i in range(LIMIT):
            await send_and_echo(sockets[i % 2], f"w{i}", f"c{i}")
        for n, ws in enumerate(sockets):
            await ws.send(json.dumps({"type": "message", "content": "x", "client_msg_id": f"o{n}"}))
            error = await recv_until(ws, "error")
            assert (error["code"], error.get("client_msg_id")) == ("RATE_LIMIT", f"o{n}")
            assert 0 < error["retry_after"] <= INTERVAL_MS
    finally:
        for ws in sockets:
            await ws.close()
    assert await stored(https[1], sid) == [f"w{i}" for i in range(LIMIT)]
