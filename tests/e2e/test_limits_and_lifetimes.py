"""Limits where a client controls size or time, and what the service leaves on disk.

Real server processes: oversized request heads get 431 without the server reading them
into memory, a client that stops reading is dropped by the write timeout even under
light traffic (and leaves presence), a WebSocket ends when its token does, handshakes
from foreign origins are refused when CORS_ORIGINS is set, and the data directory and
the SQLite files are private to the service's user.
"""

from __future__ import annotations

import asyncio
import json
import socket
import stat
from pathlib import Path

import httpx
import pytest
import websockets

from chatservice.auth import TokenCodec
from tests.conftest import TEST_SECRET, ServerProcess, new_user, start_server
from tests.e2e.conftest import (
    assert_server_works,
    bearer,
    close_code,
    frames_until_pong,
    recv_until,
    ws_url,
)

API = "/api/chat"
HEAD_LIMIT = 16_384


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    server = start_server(
        tmp_path_factory.mktemp("limited"),
        MAX_REQUEST_HEADER_BYTES=HEAD_LIMIT,
        WS_WRITE_TIMEOUT=2,
        CORS_ORIGINS="https://app.example",
    )
    yield server  # type: ignore[misc]
    server.stop()


def raw_request(port: int, head: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(head)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused mid-send: the answer was written before the close
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
        return received


@pytest.mark.parametrize("size", [HEAD_LIMIT + 1_000, 4 * 1024 * 1024])
def test_oversized_headers_get_431(limited: ServerProcess, size: int) -> None:
    head = (
        b"GET /api/chat/sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + b"a" * size
        + b"\r\n\r\n"
    )
    answer = raw_request(limited.port, head)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"HEADERS_TOO_LARGE" in answer
    assert answer.count(b"HTTP/1.1 ") == 1, answer  # one answer, nothing after it


def test_many_headers_and_a_long_url_count_too(limited: ServerProcess) -> None:
    many = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(300))
    answer = raw_request(limited.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 431 ")
    long_url = b"GET /healthz?" + b"q" * (HEAD_LIMIT * 2) + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    assert raw_request(limited.port, long_url).startswith(b"HTTP/1.1 431 ")


async def test_heads_under_the_limit_and_bodies_over_it_are_fine(
    limited: ServerProcess, tokens: TokenCodec
) -> None:
    headers = {**bearer(tokens.issue(new_user("h"))), "X-Padding": "p" * (HEAD_LIMIT // 2)}
    async with httpx.AsyncClient(base_url=limited.base_url, timeout=10) as http:
        created = await http.post(f"{API}/sessions", json={"title": "t"}, headers=headers)
        assert created.status_code == 201
        sid = created.json()["session_id"]
        # A body bigger than the head limit is not a head.
        sent = await http.post(
            f"{API}/sessions/{sid}/messages", json={"content": "b" * 40_000}, headers=headers
        )
        assert sent.status_code == 201, sent.text
    await assert_server_works(limited.base_url, tokens)


async def test_an_oversized_websocket_handshake_gets_431(limited: ServerProcess) -> None:
    token = TokenCodec(TEST_SECRET).issue(new_user("ws"))
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(
            ws_url(limited, "sess_x", token),
            additional_headers={"X-Big": "b" * (HEAD_LIMIT * 2)},
        ):
            pass
    assert refused.value.response.status_code == 431


async def test_a_websocket_closes_with_4401_when_its_token_expires(
    limited: ServerProcess,
) -> None:
    codec = TokenCodec(TEST_SECRET)
    user = new_user("expiring")
    async with httpx.AsyncClient(base_url=limited.base_url, timeout=10) as http:
        created = await http.post(
            f"{API}/sessions", json={"title": "t"}, headers=bearer(codec.issue(user))
        )
        sid = created.json()["session_id"]
    short = codec.issue(user, ttl_seconds=2)
    async with websockets.connect(ws_url(limited, sid, short)) as ws:
        await frames_until_pong(ws)
        started = asyncio.get_running_loop().time()
        assert await close_code(ws, timeout=10) == 4401
        assert asyncio.get_running_loop().time() - started < 5


async def test_handshakes_from_foreign_origins_are_refused(limited: ServerProcess) -> None:
    codec = TokenCodec(TEST_SECRET)
    user = new_user("origin")
    token = codec.issue(user)
    async with httpx.AsyncClient(base_url=limited.base_url, timeout=10) as http:
        created = await http.post(f"{API}/sessions", json={"title": "t"}, headers=bearer(token))
        sid = created.json()["session_id"]
    async with websockets.connect(ws_url(limited, sid, token), origin="https://evil.example") as ws:
        assert await close_code(ws) == 4403
    async with websockets.connect(ws_url(limited, sid, token), origin="https://app.example") as ws:
        assert (await recv_until(ws, "connected"))["session_id"] == sid
    # Clients that are not browsers send no Origin at all.
    async with websockets.connect(ws_url(limited, sid, token)) as ws:
        assert (await recv_until(ws, "connected"))["session_id"] == sid


async def test_a_client_that_stops_reading_is_dropped_and_leaves_presence(
    limited: ServerProcess,
) -> None:
    """Light traffic (never near the 1,024-frame queue) that the client never reads: the
    socket's buffers fill, a write outlasts WS_WRITE_TIMEOUT=2 and the server closes it."""
    codec = TokenCodec(TEST_SECRET)
    alice, bob = new_user("reader"), new_user("stalled")
    async with httpx.AsyncClient(base_url=limited.base_url, timeout=10) as http:
        created = await http.post(
            f"{API}/sessions",
            json={"title": "t", "participants": [bob]},
            headers=bearer(codec.issue(alice)),
        )
        sid = created.json()["session_id"]
    watcher = await websockets.connect(ws_url(limited, sid, codec.issue(alice)), max_size=None)
    stalled = stalled_websocket(limited, sid, codec.issue(bob))
    try:
        await recv_until(watcher, "connected")
        content = "x" * 60_000
        left = None
        for i in range(400):  # at most 24 MB, 20 frames/s: far below the queue bound
            await watcher.send(json.dumps({"type": "message", "content": content}))
            while True:
                try:
                    frame = json.loads(await asyncio.wait_for(watcher.recv(), 0.05))
                except TimeoutError:
                    break
                if frame.get("type") == "system" and frame.get("event") == "user_left":
                    left = frame
            if left is not None:
                break
            assert i < 399, "the stalled client was never dropped"
        assert left is not None and left["user_id"] == bob
    finally:
        await watcher.close()
        stalled.close()


def stalled_websocket(server: ServerProcess, session_id: str, token: str) -> socket.socket:
    """A real WebSocket handshake on a raw socket with a tiny receive buffer, after which
    the client reads nothing at all."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(
        f"GET /ws/{session_id}?token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    assert sock.recv(12) == b"HTTP/1.1 101"
    return sock


def test_the_data_directory_and_database_are_private(tmp_path: Path) -> None:
    """The server creates DATA_DIR itself here (the harness only holds the log)."""
    inner = tmp_path / "fresh" / "inner"
    server = start_server(tmp_path / "harness", DATA_DIR=str(inner))
    try:
        assert stat.S_IMODE(inner.stat().st_mode) == 0o700
        assert stat.S_IMODE((inner / "storage").stat().st_mode) == 0o700
        for name in ("chat.db", "chat.db-wal", "chat.db-shm", "jwt_secret"):
            path = inner / name
            assert path.exists() or name != "chat.db", name
            if path.exists():
                assert stat.S_IMODE(path.stat().st_mode) == 0o600, (name, oct(path.stat().st_mode))
    finally:
        server.stop()


async def test_permessage_deflate_is_off_unless_configured(
    limited: ServerProcess, tmp_path: Path
) -> None:
    """The client offers compression (websockets does by default); the server declines,
    unless WS_PER_MESSAGE_DEFLATE=true."""
    token = TokenCodec(TEST_SECRET).issue(new_user("deflate"))
    async with websockets.connect(ws_url(limited, "sess_none", token)) as ws:
        assert "permessage-deflate" in ws.request.headers.get("Sec-WebSocket-Extensions", "")
        assert ws.response.headers.get("Sec-WebSocket-Extensions") is None
    compressing = start_server(tmp_path / "deflate", WS_PER_MESSAGE_DEFLATE="true")
    try:
        async with websockets.connect(ws_url(compressing, "sess_none", token)) as ws:
            extensions = ws.response.headers.get("Sec-WebSocket-Extensions", "")
            assert extensions.startswith("permessage-deflate")
    finally:
        compressing.stop()
