"""The bus protocol every backend implements (memory in-process, Redis across instances)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

# Called on the event loop for each message on a subscribed channel; must not block.
Handler = Callable[[str, bytes], None]


class Bus(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise if the bus cannot carry messages right now (readiness)."""

    async def publish(self, channel: str, data: bytes) -> None: ...

    async def subscribe(self, channels: Sequence[str], handler: Handler) -> None:
        """Deliver every later message on `channels` to `handler`.

        Returns once the subscription is in effect: a message published after this
        returns is seen by the handler (the hub's no-gap replay relies on it).
        """

    async def unsubscribe(self, channels: Sequence[str], handler: Handler) -> None: ...
