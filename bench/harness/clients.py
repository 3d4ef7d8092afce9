"""The client side: tokens signed with the servers' secret, sessions over REST, live
WebSocket connections."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

import httpx
import orjson
import websockets
from websockets.asyncio.client import ClientConnection

from chatservice.auth import TokenCodec
from chatservice.client import RealtimeConnection
from harness.server import SECRET

API = "/api/chat"
PING_TIMEOUT = 15.0
_CODEC = TokenCodec(SECRET)


def token(user: str, **claims: Any) -> str:
    """A token for `user` (`ttl_seconds`, `name`, `roles`: as TokenCodec.issue takes them)."""
    return _CODEC.issue(user, **claims)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def new_user(label: str, name: str) -> tuple[str, str]:
    """A fresh user id and its token (the name becomes the transcript's display name)."""
    user = f"bench-{label}-{uuid.uuid4().hex[:8]}"
    return user, token(user, name=name)


async def create_session(http: httpx.AsyncClient, owner_token: str, **body: Any) -> str:
    """POST /api/chat/sessions with `body` (title, kind, participants, agent_id, …) as the
    token's user; the new session's id."""
    response = await http.post(f"{API}/sessions", json=body, headers=bearer(owner_token))
    if response.status_code != 201:
        raise RuntimeError(f"POST /sessions: {response.status_code} {response.text[:300]}")
    return str(response.json()["session_id"])


def ws_url(base_url: str, session_id: str, user_token: str) -> str:
    return RealtimeConnection(base_url, session_id, user_token).url


async def open_live(url: str, compression: str | None, timeout: float) -> ClientConnection:
    """Connect and wait for the pong that proves the connection is attached to the hub:
    the server answers `ping` only then."""
    ws = await websockets.connect(
        url,
        compression=compression,
        open_timeout=timeout,
        ping_interval=None,  # no client keepalive: a busy generator must not drop itself
        close_timeout=2,
        max_size=2**22,
    )
    try:
        await ws.send('{"type":"ping"}')
        deadline = time.monotonic() + PING_TIMEOUT
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no pong")
            raw = await asyncio.wait_for(ws.recv(decode=False), remaining)
            if orjson.loads(raw).get("type") == "pong":
                return ws
    except BaseException:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(), 2)
        raise


async def close_ws(*sockets: ClientConnection | None) -> None:
    await asyncio.gather(
        *(asyncio.wait_for(ws.close(), 2) for ws in sockets if ws is not None),
        return_exceptions=True,
    )
