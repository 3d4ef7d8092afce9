"""WS_MAX_CONNECTIONS and heartbeats (WS_HEARTBEAT_INTERVAL / WS_CONNECTION_TIMEOUT)."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator, Iterator

import pytest
from websockets.exceptions import ConnectionClosed

from chatservice.auth import TokenCodec
from chatservice.client import ChatClient, RealtimeConnection
from tests.conftest import ServerProcess, new_user, start_server
from tests.e2e.conftest import close_code, frames_until_pong, recv_until, ws_connect

MAX_CONNECTIONS = 3


@pytest.fixture(scope="module")
def tight_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = start_server(
        tmp_path_factory.mktemp("server-tight"),
        WS_MAX_CONNECTIONS=MAX_CONNECTIONS,
        WS_HEARTBEAT_INTERVAL=0.5,
        WS_CONNECTION_TIMEOUT=1,
    )
    yield proc
    proc.stop()


@pytest.fixture
async def room(tight_server: ServerProcess, tokens: TokenCodec) -> AsyncIterator[tuple[str, ...]]:
    alice, bob = new_user("alice"), new_user("bob")
    async with ChatClient(tight_server.base_url, tokens.issue(alice)) as client:
        sid = (await client.create_session(title="tight", participants=[bob]))["session_id"]
        yield sid, alice, bob


async def test_connections_over_the_limit_are_refused_with_1013(
    tight_server: ServerProcess, tokens: TokenCodec, room: tuple[str, str, str]
) -> None:
    sid, alice, bob = room
    open_ = [await ws_connect(tight_server, sid, tokens.issue(alice)) for _ in range(2)]
    try:
        for ws in open_:
            await frames_until_pong(ws)
        # Refused connections (bad token, stranger) never take a slot.
        for token in ("bad", tokens.issue(new_user("stranger"))):
            ws = await ws_connect(tight_server, sid, token)
            assert await close_code(ws) in (4401, 4403)
        third = await ws_connect(tight_server, sid, tokens.issue(bob))
        open_.append(third)
        await frames_until_pong(third)

        extra = await ws_connect(tight_server, sid, tokens.issue(bob))
        assert await close_code(extra) == 1013

        # A slot frees when a connection closes, and is usable again.
        await open_.pop(0).close()
        await asyncio.sleep(0.3)
        again = await ws_connect(tight_server, sid, tokens.issue(bob))
        open_.append(again)
        assert await frames_until_pong(again) is not None
    finally:
        for ws in open_:
            await ws.close()


async def test_dead_peer_is_dropped_by_the_heartbeat(
    tight_server: ServerProcess, tokens: TokenCodec, room: tuple[str, str, str]
) -> None:
    """A peer that completed the handshake and then went silent (answers no ping) is
    closed by the server, and the others see it leave."""
    sid, alice, bob = room
    async with RealtimeConnection(tight_server.base_url, sid, tokens.issue(alice)) as watcher:
        await watcher.ping()
        await watcher.receive_until("pong")
        # A hand-made WebSocket handshake on a bare TCP stream that is then never read.
        reader, writer = await asyncio.open_connection("127.0.0.1", tight_server.port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET /ws/{sid}?token={tokens.issue(bob)} HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{tight_server.port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101"), head
        try:
            joined = await watcher.receive_until("system")
            assert (joined["event"], joined["user_id"]) == ("user_joined", bob)
            # Interval 0.5 s + timeout 1 s: well within 10 s the server gives up on it.
            left = await watcher.receive_until("system", timeout=10)
            assert (left["event"], left["user_id"]) == ("user_left", bob)
            # And the server really closed the TCP connection.
            data = await asyncio.wait_for(reader.read(), 10)
            assert isinstance(data, bytes)
        finally:
            writer.close()


async def test_live_clients_survive_heartbeats(
    tight_server: ServerProcess, tokens: TokenCodec, room: tuple[str, str, str]
) -> None:
    """Clients that answer pings are not dropped, even when idle for several intervals."""
    sid, alice, bob = room
    a = await ws_connect(tight_server, sid, tokens.issue(alice))
    b = await ws_connect(tight_server, sid, tokens.issue(bob))
    try:
        await frames_until_pong(b)
        await asyncio.sleep(3)  # six heartbeat intervals of silence
        await a.send('{"type": "message", "content": "still there?"}')
        got = await recv_until(b, "message")
        assert got["content"] == "still there?"
    except ConnectionClosed as exc:  # pragma: no cover - the failure we guard against
        pytest.fail(f"an idle but healthy client was dropped: {exc}")
    finally:
        await a.close()
        await b.close()
