"""In-process bus: the embedded default, for one instance."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from chatservice.bus.base import Handler, Reconnected

log = logging.getLogger(__name__)


class MemoryBus:
    """Delivers synchronously to the subscribers of this process.

    Publishing calls the handlers directly: there is no queue between the publisher and
    the hub, so nothing can pile up here, and order per channel is publish order.
    """

    def __init__(self) -> None:
        self._handlers: dict[str, list[Handler]] = {}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._handlers.clear()

    async def ping(self) -> None:
        return None

    def on_reconnect(self, listener: Reconnected) -> None:
        """In-process delivery has no link to lose."""

    async def publish(self, channel: str, data: bytes) -> None:
        for handler in tuple(self._handlers.get(channel, ())):
            try:
                handler(channel, data)
            except Exception:  # one broken subscriber must not fail the publisher
                log.exception("bus handler failed on %s", channel)

    async def subscribe(self, channels: Sequence[str], handler: Handler) -> None:
        for channel in channels:
            self._handlers.setdefault(channel, []).append(handler)

    async def unsubscribe(self, channels: Sequence[str], handler: Handler) -> None:
        for channel in channels:
            handlers = self._handlers.get(channel)
            if handlers and handler in handlers:
                handlers.remove(handler)
                if not handlers:
                    del self._handlers[channel]
