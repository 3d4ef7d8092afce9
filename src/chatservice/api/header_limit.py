"""A cap on the request line and headers, enforced while they arrive (431 above it).

uvicorn's httptools protocol has no such cap: a 32 MB `Authorization` header is read
whole into memory and handed to the application. No ASGI middleware can help, because
the application only sees a request once its headers are complete; so this subclasses
uvicorn's protocol (pinned by uv.lock) and counts the bytes received while a request's
head is still incomplete. WebSocket handshakes pass through here too.
"""

from __future__ import annotations

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class _HeadTooLarge(Exception):
    pass


class _BoundedHead(HttpToolsProtocol):
    max_head_bytes = 32_768

    _head_bytes = 0
    _head_complete = False
    _refused = False

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._head_complete = False

    def on_headers_complete(self) -> None:
        self._head_complete = True
        # A head that arrived in one read was never counted by `data_received`.
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.max_head_bytes:
            self._refuse()
            # Stops the parser: no request cycle starts. uvicorn answers a parser error
            # with a 400 on the transport, which is already closing, so nothing is sent.
            raise _HeadTooLarge
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        super().data_received(data)
        if self._head_complete or self.transport.is_closing():
            return
        # Still inside a head: everything received since it began belongs to it (at most
        # one read of the next request too, which only makes the cap a little stricter).
        self._head_bytes += len(data)
        if self._head_bytes > self.max_head_bytes:
            self._refuse()

    def handle_websocket_upgrade(self) -> None:
        super().handle_websocket_upgrade()
        # The socket now belongs to the WebSocket protocol and this object is done. Its
        # parser holds callbacks bound to it (a reference cycle uvicorn breaks only in
        # `connection_lost`, which now goes to the WebSocket protocol): without this, each
        # WebSocket leaves its handshake's protocol, transport and buffers for the cyclic
        # collector, which in a long-running process runs too rarely for that much memory.
        self.parser = None  # type: ignore[assignment]

    def send_400_response(self, msg: str) -> None:
        # The parser error we raised to stop the request is answered by uvicorn with a 400;
        # our 431 is already on its way and the connection closing.
        if not self._refused:
            super().send_400_response(msg)

    def _refuse(self) -> None:
        if self._refused:
            return
        self._refused = True
        body = orjson.dumps(
            {
                "error": {
                    "code": "HEADERS_TOO_LARGE",
                    "message": f"request headers are larger than {self.max_head_bytes} bytes",
                }
            }
        )
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n"
            b"connection: close\r\n\r\n" + body
        )
        self.transport.close()


def bounded_http_protocol(max_head_bytes: int) -> type[HttpToolsProtocol]:
    """uvicorn's `http=` protocol class with the given cap (uvicorn builds it itself)."""
    return type("BoundedHttpToolsProtocol", (_BoundedHead,), {"max_head_bytes": max_head_bytes})
