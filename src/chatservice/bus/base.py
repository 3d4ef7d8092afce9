"""The protocols every bus backend implements (memory in-process, Redis across instances).

Three small capabilities, each with a memory and a Redis member: pub/sub (`Bus`),
who is connected where (`Presence`) and per-user send budgets (`RateLimiter`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol


def is_outage(exc: BaseException) -> bool:
    """Whether `exc` says a backend could not be reached: an outage to ride out and retry
    (Redis restarting, a network blip), not a bug to report with a traceback."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return isinstance(exc, OSError | TimeoutError | RedisConnectionError | RedisTimeoutError)


# Called on the event loop for each message on a subscribed channel; must not block.
Handler = Callable[[str, bytes], None]
Reconnected = Callable[[], Awaitable[None]]


class Bus(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise if the bus cannot carry messages right now (readiness)."""

    async def publish(self, channel: str, data: bytes) -> None:
        """Send `data` to every subscriber of `channel` on every instance.

        Never raises for a broken link: the event is then delivered to this instance
        only, and the hubs of the others catch up from the database when it is back.
        """

    async def subscribe(self, channels: Sequence[str], handler: Handler) -> None:
        """Deliver every later message on `channels` to `handler`.

        Returns once the subscription is in effect: a message published after this
        returns is seen by the handler (the hub's no-gap replay relies on it).
        """

    async def unsubscribe(self, channels: Sequence[str], handler: Handler) -> None: ...

    def on_reconnect(self, listener: Reconnected) -> None:
        """Call `listener` after a lost link is restored (messages may have been missed)."""


# The session of a presence entry that says only "this user has a connection here": a
# multiplexed connection is the user being online even before it follows any session.
ANYWHERE = ""


@dataclass(frozen=True, slots=True)
class PresenceEntry:
    session_id: str
    user_id: str
    conn_id: str


class Presence(Protocol):
    """Live connections per session and user, across instances, expiring on their own."""

    async def join(self, entry: PresenceEntry) -> bool:
        """Record a connection; True when it is the user's first in the session."""

    async def leave(self, entry: PresenceEntry) -> bool:
        """Forget a connection; True when it was the user's last in the session."""

    async def refresh(self, entries: Sequence[PresenceEntry]) -> None:
        """Heartbeat: keep these connections alive for another timeout."""

    async def online(self, session_id: str) -> list[str]:
        """Users with at least one live connection to the session, sorted."""

    async def user_online(self, user_id: str) -> bool:
        """Whether the user has a live connection anywhere, on any instance."""

    async def sweep(self) -> list[tuple[str, str]]:
        """Drop expired connections (a crashed instance's); returns the (session, user)
        pairs that thereby lost their last connection."""


class RateLimiter(Protocol):
    async def hit(self, key: str) -> int | None:
        """Count one send for `key`: None when allowed, else milliseconds to wait."""


@dataclass(slots=True)
class StreamState:
    """An agent answer as the buffer knows it: who, where, how far, and the chunks."""

    message_id: str
    session_id: str
    status: str  # "streaming" | "completed" | "cancelled" | "error"
    meta: dict[str, str]
    chunks: list[str]  # from the index asked for
    first_index: int


class StreamBuffer(Protocol):
    """Chunks of answers in progress, kept (with a TTL) so clients can resume them."""

    async def open(self, message_id: str, session_id: str, meta: dict[str, str]) -> None: ...

    async def append(self, message_id: str, text: str) -> None: ...

    async def finish(self, message_id: str, status: str) -> None: ...

    async def read(self, message_id: str, from_index: int = 0) -> StreamState | None: ...

    async def active(self, session_id: str) -> list[str]:
        """Message ids of the session's answers still streaming."""


class Locks(Protocol):
    """Short leases so one instance at a time does a piece of work."""

    async def acquire(self, name: str, ttl_seconds: float) -> bool: ...

    async def renew(self, name: str, ttl_seconds: float) -> bool: ...

    async def release(self, name: str) -> None: ...
