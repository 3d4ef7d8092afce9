"""Helpers for driving a real server the way third-party clients do.

The SDK (`chatservice.client`) is exercised in most tests; the helpers here use the plain
`websockets` and `httpx` libraries so the protocol is also checked without the SDK's help.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from chatservice.auth import TokenCodec
from chatservice.client import ChatClient
from tests.conftest import ServerProcess, new_user, start_server

JSON = dict[str, Any]

# The limits of the `small_server`: frames/content over 1 KiB, request bodies over 4 KiB.
SMALL_FRAME_LIMIT = 1024
SMALL_BODY_LIMIT = 4096


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def ws_url(server: ServerProcess, session_id: str, token: str | None = None, **params: Any) -> str:
    query: dict[str, Any] = {}
    if token is not None:
        query["token"] = token
    query.update(params)
    suffix = f"?{urlencode(query)}" if query else ""
    return f"{server.ws_url}/ws/{session_id}{suffix}"


async def ws_connect(
    server: ServerProcess, session_id: str, token: str | None = None, **kwargs: Any
) -> ClientConnection:
    """A raw `websockets` connection; `since_seq` (and other params) go in the query."""
    params = {k: kwargs.pop(k) for k in ("since_seq",) if k in kwargs}
    return await websockets.connect(ws_url(server, session_id, token, **params), **kwargs)


async def recv_json(ws: ClientConnection, timeout: float = 5.0) -> JSON:
    raw = await asyncio.wait_for(ws.recv(), timeout)
    assert isinstance(raw, str), f"server sent a binary frame: {raw!r}"
    frame = json.loads(raw)
    assert isinstance(frame, dict), frame
    return frame


async def recv_until(ws: ClientConnection, frame_type: str, timeout: float = 5.0) -> JSON:
    """Skip frames until one of `frame_type` arrives."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise TimeoutError(f"no {frame_type!r} frame within {timeout}s")
        frame = await recv_json(ws, remaining)
        if frame.get("type") == frame_type:
            return frame


async def frames_until_pong(ws: ClientConnection, timeout: float = 5.0) -> list[JSON]:
    """Send a ping and return every frame that arrives before its pong.

    Frames a connection gets are written in the order the server queued them, so this is
    a barrier: anything queued for this connection before the ping shows up here.
    """
    await ws.send(json.dumps({"type": "ping"}))
    seen: list[JSON] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        frame = await recv_json(ws, max(0.01, deadline - loop.time()))
        if frame.get("type") == "pong":
            return seen
        seen.append(frame)


async def close_code(ws: ClientConnection, timeout: float = 5.0) -> int | None:
    """Read until the server closes; return the close code it sent."""
    try:
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd else None


async def send_and_echo(ws: ClientConnection, content: str, cid: str) -> JSON:
    """Send a message frame and wait for our own copy of it (matched by client_msg_id)."""
    await ws.send(json.dumps({"type": "message", "content": content, "client_msg_id": cid}))
    while True:
        frame = await recv_json(ws)
        if frame.get("type") == "message" and frame.get("client_msg_id") == cid:
            return frame
        assert frame.get("type") != "error", frame


@dataclass
class User:
    """A fresh user id, its token, and an SDK client logged in as it."""

    id: str
    token: str
    client: ChatClient

    @property
    def headers(self) -> dict[str, str]:
        return bearer(self.token)


class Users:
    def __init__(self, server: ServerProcess, tokens: TokenCodec) -> None:
        self.server = server
        self.tokens = tokens
        self._clients: list[ChatClient] = []

    def __call__(self, prefix: str = "user") -> User:
        user_id = new_user(prefix)
        token = self.tokens.issue(user_id)
        client = ChatClient(self.server.base_url, token)
        self._clients.append(client)
        return User(user_id, token, client)

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()


@pytest.fixture
async def users(server: ServerProcess, tokens: TokenCodec) -> AsyncIterator[Users]:
    """`users("alice")` → a fresh User on the shared server."""
    made = Users(server, tokens)
    yield made
    await made.aclose()


@pytest.fixture(scope="session")
def small_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server with tiny limits: WS_MESSAGE_SIZE_LIMIT=1024, MAX_REQUEST_BODY=4096."""
    proc = start_server(
        tmp_path_factory.mktemp("server-small"),
        WS_MESSAGE_SIZE_LIMIT=SMALL_FRAME_LIMIT,
        MAX_REQUEST_BODY=SMALL_BODY_LIMIT,
    )
    yield proc
    proc.stop()


@pytest.fixture
async def small_users(small_server: ServerProcess, tokens: TokenCodec) -> AsyncIterator[Users]:
    made = Users(small_server, tokens)
    yield made
    await made.aclose()


async def assert_server_works(base_url: str, tokens: TokenCodec) -> None:
    """A fresh user can still create a session, send and read back a message."""
    user = new_user("health")
    async with httpx.AsyncClient(base_url=base_url, headers=bearer(tokens.issue(user))) as c:
        created = await c.post("/api/chat/sessions", json={"title": "still alive"})
        assert created.status_code == 201, created.text
        sid = created.json()["session_id"]
        sent = await c.post(f"/api/chat/sessions/{sid}/messages", json={"content": "ok?"})
        assert sent.status_code == 201, sent.text
        page = await c.get(f"/api/chat/sessions/{sid}/messages")
        assert [m["content"] for m in page.json()["messages"]] == ["ok?"]
