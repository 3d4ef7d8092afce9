"""The realtime side of the SDK: one WebSocket connection to one session."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any
from urllib.parse import urlencode

import orjson
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed as _WSClosed
from websockets.exceptions import InvalidHandshake

JSON = dict[str, Any]

# Close codes that mean "do not come back": bad request, bad token, no access, no session.
REFUSALS = frozenset({4400, 4401, 4403, 4404})
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0


class ConnectionClosed(Exception):
    """The server closed the connection; `code` and `reason` say why (README, close codes)."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"connection closed ({code}): {reason}")
        self.code = code
        self.reason = reason


class RealtimeConnection:
    """Frames of one session as dicts, with helpers for each client frame.

    The connection repairs itself: when it drops (network, a restarted or crashed
    instance, a 4008 for reading too slowly) it reconnects with exponential backoff and
    jitter, to the next of `base_url`'s addresses when several are given, asking for
    `since_seq` = the last message seq it delivered. The caller sees one ordered stream
    without gaps or duplicates. Refusals (4400/4401/4403/4404), a close the caller asked
    for, or no success within `reconnect_timeout` end the stream with ConnectionClosed.
    """

    def __init__(
        self,
        base_url: str | Sequence[str],
        session_id: str,
        token: str,
        *,
        since_seq: int | None = None,
        reconnect: bool = True,
        reconnect_timeout: float = 30.0,
        max_size: int | None = 2**22,
    ) -> None:
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not urls:
            raise ValueError("at least one base URL is needed")
        self.base_urls = [u.rstrip("/") for u in urls]
        self.session_id = session_id
        self.token = token
        self.since_seq = since_seq
        self.last_seq = since_seq or 0
        self.reconnect = reconnect
        self.reconnect_timeout = reconnect_timeout
        self.reconnects = 0
        self._url_index = 0
        self._resuming = since_seq is not None
        self._closing = False
        self._max_size = max_size
        self._ws: ClientConnection | None = None
        self._stream_seen: dict[str, int] = {}  # answer id -> highest index passed on
        self._reconnecting = asyncio.Lock()

    @property
    def base_url(self) -> str:
        return self.base_urls[self._url_index]

    @property
    def url(self) -> str:
        base = self.base_url.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
        query: dict[str, Any] = {"token": self.token}
        if self._resuming:
            query["since_seq"] = self.last_seq
        return f"{base}/ws/{self.session_id}?{urlencode(query)}"

    async def connect(self) -> RealtimeConnection:
        # A deep receive queue: with websockets' default of 16, a caller that leaves
        # frames unread stops the socket being read, and close() then waits out its
        # whole timeout because it cannot see the server's close frame.
        self._ws = await websockets.connect(
            self.url, max_size=self._max_size, max_queue=1024, close_timeout=2
        )
        return self

    async def __aenter__(self) -> RealtimeConnection:
        return await self.connect()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        self._closing = True
        if self._ws is not None:
            await self._ws.close()

    async def _reconnect(self, cause: ConnectionClosed, broken: ClientConnection | None) -> None:
        """Connect again, resuming after `last_seq`; raise `cause` if it cannot.

        A reader and a writer task may both notice the same drop: the first repairs it,
        the second finds a new connection in place and uses it.
        """
        async with self._reconnecting:
            if self._ws is not broken:
                return
            await self._connect_again(cause)

    async def _connect_again(self, cause: ConnectionClosed) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.reconnect_timeout
        delay = BACKOFF_FIRST
        self._resuming = True
        while True:
            try:
                await self.connect()
                self.reconnects += 1
                return
            except (OSError, InvalidHandshake, TimeoutError):
                self._url_index = (self._url_index + 1) % len(self.base_urls)
            pause = delay * random.uniform(0.5, 1.5)
            if loop.time() + pause > deadline:
                raise cause
            await asyncio.sleep(pause)
            delay = min(delay * 2, BACKOFF_MAX)

    def _recoverable(self, closed: ConnectionClosed) -> bool:
        return self.reconnect and not self._closing and closed.code not in REFUSALS

    # -- sending --------------------------------------------------------------------------

    async def send_frame(self, frame: JSON) -> None:
        """Send a frame; a dropped connection is repaired first (sends carry a
        client_msg_id, so one that did arrive before the drop is not stored twice)."""
        text = orjson.dumps(frame).decode()
        while True:
            socket = self._socket()
            try:
                await socket.send(text)
                return
            except _WSClosed as exc:
                closed = _closed(exc)
                if not self._recoverable(closed):
                    raise closed from exc
                await self._reconnect(closed, socket)

    async def send_message(
        self, content: str, *, client_msg_id: str | None = None, metadata: JSON | None = None
    ) -> str:
        """Send a message; returns its client_msg_id (generated when not given)."""
        client_msg_id = client_msg_id or uuid.uuid4().hex
        frame: JSON = {"type": "message", "content": content, "client_msg_id": client_msg_id}
        if metadata is not None:
            frame["metadata"] = metadata
        await self.send_frame(frame)
        return client_msg_id

    async def typing(self, is_typing: bool = True) -> None:
        await self.send_frame({"type": "typing", "is_typing": is_typing})

    async def read(self, seq: int) -> None:
        await self.send_frame({"type": "read", "seq": seq})

    async def ping(self) -> None:
        await self.send_frame({"type": "ping"})

    # -- receiving ------------------------------------------------------------------------

    async def receive(self, timeout: float | None = None) -> JSON:
        """The next frame; raises ConnectionClosed when the stream cannot go on."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            socket = self._socket()
            try:
                raw = await asyncio.wait_for(socket.recv(), remaining)
            except _WSClosed as exc:
                closed = _closed(exc)
                if not self._recoverable(closed):
                    raise closed from exc
                await self._reconnect(closed, socket)
                continue
            frame: JSON = orjson.loads(raw)
            if self._already_delivered(frame):
                continue
            return frame

    def _already_delivered(self, frame: JSON) -> bool:
        """After a reconnect the server resends an answer's start and chunks so far, and
        messages after `since_seq`; pass each on to the caller once only."""
        kind = frame.get("type")
        if kind == "connected":
            self.last_seq = max(self.last_seq, int(frame.get("since_seq") or 0))
            return False
        stream_id = frame.get("message_id")
        if kind in ("stream_start", "stream_chunk") and isinstance(stream_id, str):
            index = frame.get("index") if kind == "stream_chunk" else -1
            if not isinstance(index, int) or index <= self._stream_seen.get(stream_id, -2):
                return True
            self._stream_seen[stream_id] = index
            return False
        if kind == "stream_end" and isinstance(stream_id, str):
            self._stream_seen.pop(stream_id, None)
        if kind in ("message", "stream_end"):
            seq = frame.get("seq")
            if isinstance(seq, int):
                if seq <= self.last_seq and self.reconnects:
                    return True
                self.last_seq = max(self.last_seq, seq)
        return False

    async def receive_until(self, frame_type: str, timeout: float = 10.0) -> JSON:
        """Skip frames until one of `frame_type` arrives."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"no {frame_type} frame within {timeout}s")
            frame = await self.receive(remaining)
            if frame.get("type") == frame_type:
                return frame

    def __aiter__(self) -> AsyncIterator[JSON]:
        return self._frames()

    async def _frames(self) -> AsyncIterator[JSON]:
        while True:
            try:
                yield await self.receive()
            except ConnectionClosed:
                return

    def _socket(self) -> ClientConnection:
        if self._ws is None:
            raise RuntimeError("not connected: use `async with` or `await connect()`")
        return self._ws


def _closed(exc: _WSClosed) -> ConnectionClosed:
    rcvd = exc.rcvd
    return ConnectionClosed(rcvd.code if rcvd else None, rcvd.reason if rcvd else "connection lost")
