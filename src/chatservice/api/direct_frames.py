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


class DirectFramesProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol, plus batched writes for the application."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.paused_since = 0.0
        self._resume: Callable[[], None] | None = None

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        if not self.close_sent:  # the handshake was accepted and the application starts
            # ASGI extensions are dictionaries; this one carries the protocol itself.
            self.scope["extensions"][EXTENSION] = {"protocol": self}

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
