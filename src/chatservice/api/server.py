"""uvicorn's server, with one step added to its shutdown: drain before closing sockets.

uvicorn closes every WebSocket (1012) as soon as shutdown begins and only then runs the
application's shutdown. Answers still being generated would end after their listeners
left; here the listening sockets close first (no new clients), the drain step runs while
the connections are still open — so they receive the answers' `stream_end` — and then
uvicorn's own shutdown proceeds.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable

import uvicorn

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain: Callable[[], Awaitable[None]]) -> None:
        super().__init__(config)
        self._drain = drain

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        if not self.force_exit:
            try:
                await self._drain()
            except Exception:  # shutting down anyway: say why the drain was cut short
                log.exception("draining before shutdown failed")
        await super().shutdown(sockets)
