"""WebSocket frames written straight to the socket, a batch per write.

uvicorn's WebSocket protocol (pinned by uv.lock) takes one ASGI `websocket.send` per
frame: an await through Starlette's wrapper, a frame object serialised by the websockets
library, and a `transport.write` (a system call) for each. Under fan-out that is most of
the server's time. This subclass offers the application a second way out, through the
scope's extensions: a sink (`realtime/sink.py`) that frames a whole batch of queued
frames and writes it in one call. Everything else (the handshake, reading, pings,
closing) stays uvicorn's, and an application served by another ASGI server falls back
to `websocket.send`.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from typing import Any

from starlette.websockets import WebSocket
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request

from chatservice.realtime.sink import Close

EXTENSION = "chatservice.direct_frames"


def _text_header(size: int) -> bytes:
    """The header of one unfragmented, unmasked text frame (RFC 6455, section 5.2).

    Written here rather than by the websockets library because a server's frame header
    depends only on the payload's length: the library builds a frame object and a
    buffer per frame and connection, which is the cost being removed.
    """
    if size < 126:
        return bytes((0x81, size))
    if size < 1 << 16:
        return struct.pack("!BBH", 0x81, 126, size)
    return struct.pack("!BBQ", 0x81, 127, size)


class _Inbox:
    """What uvicorn's protocol needs of its receive queue (`put_nowait`, `get`, `empty`).

    An `asyncio.Queue` holds three deques and an Event, each deque a block of 64 slots:
    about 3 KB per connection, for a queue that rarely holds more than one event. An
    idle connection's memory is what caps how many connections one process holds.
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> Any:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.pop(0)

    def empty(self) -> bool:
        return not self._items


class _Flag:
    """What uvicorn's protocol needs of its `writable` event, without the deque of an
    `asyncio.Event` (see `_Inbox`)."""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = True
        self._waiters: list[asyncio.Future[None]] = []

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> None:
        if self._set:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter


class DirectFramesProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol, plus batched writes for the application,
    and a smaller footprint per connection: after the accept, the scope's `headers` are
    empty."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = _Inbox()  # type: ignore[assignment]
        self.writable = _Flag()  # type: ignore[assignment]
        self.paused_since = 0.0
        self._resume: Callable[[], None] | None = None

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        if not self.close_sent:  # the handshake was accepted and the application starts
            # ASGI extensions are dictionaries; this one carries the protocol itself.
            self.scope["extensions"][EXTENSION] = {"protocol": self}

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.accept":
            # The handshake's headers are done with once the application accepted (its
            # checks read them before). They are most of what an idle socket holds:
            # the request's stay alive in the websockets parser's frame for the whole
            # connection, and the scope's copy with the application.
            self.request.headers.clear()
            headers = self.scope["headers"]
            if isinstance(headers, list):  # in place: Starlette's Headers share the list
                headers.clear()
            self.request = self.response = None  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        # The scope holds this protocol and the connection's resume callback holds its
        # sink, which holds this protocol: cycles that only the cyclic collector would
        # free, and it runs too rarely for a connection's worth of memory.
        self._resume = None
        scope = getattr(self, "scope", None)  # there is none if the handshake failed
        if scope is not None:
            scope["extensions"].pop(EXTENSION, None)

    def pause_writing(self) -> None:
        super().pause_writing()
        self.paused_since = self.loop.time()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._resume is not None:
            self._resume()

    def write_texts(self, frames: list[bytes]) -> None:
        if self.close_sent or self.disconnected or self.transport.is_closing():
            raise ConnectionError("the WebSocket is closed")
        if self.conn.extensions:  # permessage-deflate: each frame is compressed apart
            for frame in frames:
                self.conn.send_text(frame)
            self.transport.write(b"".join(self.conn.data_to_send()))
            return
        parts: list[bytes] = []
        for frame in frames:
            parts.append(_text_header(len(frame)))
            parts.append(frame)
        self.transport.write(b"".join(parts))


class DirectSink:
    """A connection's sink on a `DirectFramesProtocol` socket."""

    def __init__(self, protocol: DirectFramesProtocol, close: Close) -> None:
        self._protocol = protocol
        self._close = close

    @property
    def paused(self) -> bool:
        return not self._protocol.writable.is_set()

    @property
    def paused_since(self) -> float:
        return self._protocol.paused_since

    def on_resume(self, callback: Callable[[], None]) -> None:
        self._protocol._resume = callback

    def write(self, frames: list[bytes]) -> None:
        self._protocol.write_texts(frames)

    def discard(self) -> None:
        pass  # nothing is held here: what was written is the transport's

    async def close(self, code: int, reason: str) -> None:
        await self._close(code, reason)


def direct_sink(websocket: WebSocket) -> DirectSink | None:
    """The batched sink of a socket served by `DirectFramesProtocol`, else None."""
    protocol = websocket.scope.get("extensions", {}).get(EXTENSION, {}).get("protocol")
    if isinstance(protocol, DirectFramesProtocol):
        return DirectSink(protocol, websocket.close)
    return None
