"""Request body limit, enforced while the body streams in (not after buffering it)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import orjson
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_CLOSE = (b"connection", b"close")
# After a 413 the server reads and discards the rest of the body: closing at once would
# reset the connection under a client still sending, and most clients (httpx, requests)
# would then never read the 413. Past this much, though, the connection is closed.
DRAIN_LIMIT = 64 * 1024 * 1024


class BodyTooLarge(HTTPException):
    """An HTTPException so FastAPI's body parsing lets it through as a 413."""

    def __init__(self, refusal: str) -> None:
        super().__init__(413, refusal)


@dataclass(frozen=True, slots=True)
class RouteLimit:
    """A body limit of its own for one route (uploads), with the words to refuse it."""

    method: str
    path: re.Pattern[str]
    limit: int
    message: str


class BodyLimitMiddleware:
    """Answers 413 when a request body exceeds its limit, declared or streamed.

    `limit` holds for every route but those `overrides` name (uploads, whose bodies
    are files).
    """

    def __init__(self, app: ASGIApp, limit: int, overrides: Sequence[RouteLimit] = ()) -> None:
        self.app = app
        self.default_limit = limit
        self.overrides = overrides

    def _limit_for(self, scope: Scope) -> tuple[int, str]:
        for route in self.overrides:
            if scope.get("method") == route.method and route.path.match(scope.get("path", "")):
                return route.limit, route.message
        return self.default_limit, f"request body is larger than {self.default_limit} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, refusal = self._limit_for(scope)
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > limit:
                    await self._reject(send, refusal, close=declared > limit + DRAIN_LIMIT)
                    return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(refusal)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._reject(send, refusal)

    async def _reject(self, send: Send, refusal: str, *, close: bool = False) -> None:
        body = orjson.dumps(
            {
                "error": {
                    "code": "CONTENT_TOO_LARGE",
                    "message": refusal,
                }
            }
        )
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    *([_CLOSE] if close else []),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
