"""Headers every HTTP answer carries, and a 500 that does not cost the client its connection.

Starlette answers an unhandled exception in its outermost middleware and then re-raises
it, and uvicorn closes a keep-alive connection whose application raised: the client's next
request on that connection fails. Caught here instead, the failure is logged, answered
with the usual error body, and the connection stays usable.
"""

from __future__ import annotations

import logging

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatservice.api.errors import error_response

log = logging.getLogger(__name__)


class ResponseSafety:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = MutableHeaders(scope=message)
                # No answer is to be sniffed into another type or kept by a shared cache
                # (downloads set their own caching).
                headers.setdefault("x-content-type-options", "nosniff")
                headers.setdefault("cache-control", "no-store")
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if not started:
                response = error_response(500, "INTERNAL", "internal error")
                await response(scope, receive, send_with_headers)
