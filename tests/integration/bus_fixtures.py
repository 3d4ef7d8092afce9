"""Builders for the contract suites of the bus protocols (`bus/base.py`).

Each contract test runs unchanged against the in-process member and the Redis member.
A "world" is what several instances of the service share: for the memory members that is
the one process (so every "instance" is the same object), for the Redis members it is one
Redis server (so every instance is a new object with its own connection pool, as two
`chat-service serve` processes would have).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from redis.asyncio import BlockingConnectionPool, Redis

from chatservice.bus.base import Bus, Presence, RateLimiter
from chatservice.bus.memory import MemoryBus
from chatservice.bus.presence import MemoryPresence
from chatservice.bus.ratelimit import MemoryRateLimiter
from chatservice.bus.redis import RedisBus
from chatservice.bus.redis_presence import RedisPresence
from chatservice.bus.redis_ratelimit import RedisRateLimiter

MEMBERS = ["memory", "redis"]


def unique(prefix: str = "t") -> str:
    """A name no other test (or earlier run against the same Redis) uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def redis_client(url: str) -> Redis:
    """A client built the way `app.build_components` builds it."""
    return Redis(
        connection_pool=BlockingConnectionPool.from_url(url, max_connections=20, timeout=5)
    )


def with_db(url: str, db: int) -> str:
    """The same Redis server, another logical database (keys are per database)."""
    base, _, _ = url.rpartition("/")
    return f"{base}/{db}"


async def eventually(
    check: Callable[[], bool], timeout: float = 3.0, what: str = "condition"
) -> None:
    """Poll `check` until it holds; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


@dataclass
class Inbox:
    """A bus handler that records what it is given."""

    name: str = "inbox"
    got: list[tuple[str, bytes]] = field(default_factory=list)

    def __call__(self, channel: str, data: bytes) -> None:
        self.got.append((channel, bytes(data)))

    @property
    def data(self) -> list[bytes]:
        return [d for _, d in self.got]

    def on(self, channel: str) -> list[bytes]:
        return [d for c, d in self.got if c == channel]

    async def wait_for(self, data: bytes, timeout: float = 3.0) -> None:
        await eventually(lambda: data in self.data, timeout, f"{data!r} at {self.name}")

    async def wait_count(self, count: int, timeout: float = 3.0) -> None:
        await eventually(
            lambda: len(self.got) >= count, timeout, f"{count} messages at {self.name}"
        )


class BusWorld:
    """Bus instances sharing one medium; everything made here is closed by `aclose`."""

    def __init__(self, kind: str, redis_url: str | None = None) -> None:
        self.kind = kind
        self.redis_url = redis_url
        self._memory: MemoryBus | None = None
        self._buses: list[Bus] = []
        self._clients: list[Redis] = []

    async def instance(self) -> Bus:
        """Another instance's bus: for memory the one in-process bus, for Redis a new
        started RedisBus with its own client on the same server."""
        if self.kind == "memory":
            if self._memory is None:
                self._memory = MemoryBus()
                await self._memory.start()
                self._buses.append(self._memory)
            return self._memory
        assert self.redis_url is not None
        return await self.redis_bus(self.redis_url)

    async def redis_bus(self, url: str) -> RedisBus:
        client = redis_client(url)
        self._clients.append(client)
        bus = RedisBus(client)
        await bus.start()
        self._buses.append(bus)
        return bus

    def client(self, url: str) -> Redis:
        client = redis_client(url)
        self._clients.append(client)
        return client

    async def aclose(self) -> None:
        for bus in self._buses:
            await close_bus(bus)
        for client in self._clients:
            await client.aclose()


async def close_bus(bus: Bus, timeout: float = 3.0) -> bool:
    """Close `bus`; True when `close()` finished by itself within `timeout`.

    A RedisBus whose reader task swallowed its cancellation is unstuck by closing its
    pub/sub connection under it, so one such bus does not hang the rest of the run.
    """
    closing = asyncio.ensure_future(bus.close())
    done, _ = await asyncio.wait({closing}, timeout=timeout)
    if done:
        closing.result()
        return True
    pubsub = getattr(bus, "_pubsub", None)
    if pubsub is not None:
        await pubsub.aclose()
    await asyncio.wait({closing}, timeout=timeout)
    if not closing.done():
        closing.cancel()
    return False


class PresenceWorld:
    """Presence objects of several instances sharing one store."""

    def __init__(self, kind: str, timeout: float, redis_url: str | None = None) -> None:
        self.kind = kind
        self.timeout = timeout
        self.redis_url = redis_url
        self._memory: MemoryPresence | None = None
        self._clients: list[Redis] = []
        self._count = 0

    def instance(self) -> Presence:
        if self.kind == "memory":
            if self._memory is None:
                self._memory = MemoryPresence(self.timeout)
            return self._memory
        assert self.redis_url is not None
        client = redis_client(self.redis_url)
        self._clients.append(client)
        self._count += 1
        return RedisPresence(client, self.timeout, f"test-instance-{self._count}")

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()


class LimiterWorld:
    """Rate limiters of several instances sharing one budget store."""

    def __init__(self, kind: str, redis_url: str | None = None) -> None:
        self.kind = kind
        self.redis_url = redis_url
        self._memory: dict[int, MemoryRateLimiter] = {}
        self._clients: list[Redis] = []

    def instance(self, per_minute: int) -> RateLimiter:
        if self.kind == "memory":
            return self._memory.setdefault(per_minute, MemoryRateLimiter(per_minute))
        assert self.redis_url is not None
        client = redis_client(self.redis_url)
        self._clients.append(client)
        return RedisRateLimiter(client, per_minute)

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()
