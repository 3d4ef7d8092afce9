"""The realtime side of the SDK: one WebSocket connection to one session."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any
from urllib.parse import urlencode

import orjson
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed as _WSClosed

JSON = dict[str, Any]


class ConnectionClosed(Exception):
    """The server closed the connection; `code` and `reason` say why (README, close codes)."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"connection closed ({code}): {reason}")
        self.code = code
        self.reason = reason


class RealtimeConnection:
    """Frames of one session as dicts, with helpers for each client frame.

    `last_seq` follows the highest message seq received, so a caller that reconnects can
    pass it as `since_seq` and miss nothing.
    """

    def __init__(
        self,
        base_url: str,
        session_id: str,
        token: str,
        *,
        since_seq: int | None = None,
        max_size: int | None = 2**22,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.session_id = session_id
        self.token = token
        self.since_seq = since_seq
        self.last_seq = since_seq or 0
        self._max_size = max_size
        self._ws: ClientConnection | None = None

    @property
    def url(self) -> str:
        base = self.base_url.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
        query: dict[str, Any] = {"token": self.token}
        if self.since_seq is not None:
            query["since_seq"] = self.since_seq
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
        if self._ws is not None:
            await self._ws.close()

    # -- sending --------------------------------------------------------------------------

    async def send_frame(self, frame: JSON) -> None:
        try:
            await self._socket().send(orjson.dumps(frame).decode())
        except _WSClosed as exc:
            raise _closed(exc) from exc

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
        """The next frame; raises ConnectionClosed when the server closes."""
        try:
            raw = await asyncio.wait_for(self._socket().recv(), timeout)
        except _WSClosed as exc:
            raise _closed(exc) from exc
        frame: JSON = orjson.loads(raw)
        seq = frame.get("seq")
        if frame.get("type") in ("message", "stream_end") and isinstance(seq, int):
            self.last_seq = max(self.last_seq, seq)
        return frame

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
