"""Redis pub/sub bus: the same contract as `bus/memory.py`, across instances.

One pub/sub connection per instance carries every subscription; a reader task
dispatches messages to the handlers. When Redis goes away the reader reconnects with
exponential backoff and jitter, re-subscribes, and then tells its listeners
(`on_reconnect`) so the hub can fetch from the database whatever was published while
the link was down. Publishing while Redis is down still reaches this instance's own
subscribers, and the caller is not failed: the message is already stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from chatservice.bus.base import Handler, Reconnected

log = logging.getLogger(__name__)

SUBSCRIBE_TIMEOUT = 5.0
CLOSE_TIMEOUT = 2.0
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0
# Most publishes one pipeline carries; more go in the next.
MAX_PIPELINE = 256


class RedisBus:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._handlers: dict[str, list[Handler]] = {}
        # Per subscribed channel: resolved once Redis confirmed the subscription.
        self._confirmed: dict[str, asyncio.Future[None]] = {}
        self._pubsub: PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        self._notifier: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._reconnect_listeners: list[Reconnected] = []
        self._closing = False
        self._outgoing: list[tuple[str, bytes, asyncio.Future[None]]] = []
        self._sender: asyncio.Task[None] | None = None

    def on_reconnect(self, listener: Reconnected) -> None:
        self._reconnect_listeners.append(listener)

    async def start(self) -> None:
        await self.redis.ping()  # fail start-up clearly when Redis is unreachable
        self._pubsub = self.redis.pubsub()
        self._reader = asyncio.create_task(self._read_forever(), name="redis-bus-reader")
        # Ready means the pub/sub link is up too (readiness checks it).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._connected.wait(), SUBSCRIBE_TIMEOUT)

    async def close(self) -> None:
        self._closing = True
        for task in (self._reader, self._notifier, self._sender):
            if task is not None:
                task.cancel()
        # Closing the pub/sub connection also ends a read that swallowed the cancel
        # (redis-py can, while it is connecting); never wait on the reader unboundedly.
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()
        if self._reader is not None:
            await asyncio.wait({self._reader}, timeout=CLOSE_TIMEOUT)
        self._handlers.clear()

    async def ping(self) -> None:
        await self.redis.ping()
        if not self._connected.is_set():
            raise ConnectionError("the pub/sub link to Redis is reconnecting")

    async def publish(self, channel: str, data: bytes) -> None:
        """Returns once Redis has the message (or it was delivered locally only).

        Publishes made while one is on its way go out together as one pipeline: under
        load a commit releases many messages in the same loop turn, and a round trip
        each would queue them behind one another. One sender also keeps them in order.
        """
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._outgoing.append((channel, data, done))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_outgoing(), name="redis-bus-sender")
        await done

    async def _send_outgoing(self) -> None:
        batch: list[tuple[str, bytes, asyncio.Future[None]]] = []
        try:
            while self._outgoing:
                batch = self._outgoing[:MAX_PIPELINE]
                del self._outgoing[:MAX_PIPELINE]
                failure: Exception | None = None
                try:
                    await self._send(batch)
                except Exception as exc:  # a bug, not Redis: each caller hears of it
                    failure = exc
                for _, _, done in batch:
                    if done.done():
                        continue
                    if failure is None:
                        done.set_result(None)
                    else:
                        done.set_exception(failure)
        finally:
            # Cancelled (shutdown): nobody may wait forever on a publish.
            for _, _, done in batch + self._outgoing:
                if not done.done():
                    done.cancel()
            self._outgoing.clear()
            self._sender = None

    async def _send(self, batch: list[tuple[str, bytes, asyncio.Future[None]]]) -> None:
        # Twice: after a Redis restart the pool's idle connections are dead, and the
        # first command on each fails although Redis is back.
        for attempt in (1, 2):
            try:
                if len(batch) == 1:
                    await self.redis.publish(batch[0][0], batch[0][1])
                else:
                    pipeline = self.redis.pipeline(transaction=False)
                    for channel, data, _ in batch:
                        pipeline.publish(channel, data)
                    await pipeline.execute()
                return
            except (RedisError, OSError) as exc:
                if attempt == 2:
                    log.warning(
                        "redis publish of %d message(s) failed (%s); delivering locally only",
                        len(batch),
                        exc,
                    )
        for channel, data, _ in batch:
            self._dispatch(channel, data)

    async def subscribe(self, channels: Sequence[str], handler: Handler) -> None:
        loop = asyncio.get_running_loop()
        new = [c for c in channels if c not in self._handlers]
        for channel in channels:
            self._handlers.setdefault(channel, []).append(handler)
        for channel in new:
            self._confirmed[channel] = loop.create_future()
        if not self._connected.is_set():
            # Redis is away: the reader subscribes everything in _handlers when it is
            # back and the hub then catches up from the database, so don't wait here.
            return
        try:
            if new:
                assert self._pubsub is not None
                await self._pubsub.subscribe(*new)
            # Also waits for a subscription another caller started and Redis has not
            # confirmed yet: the channel being known is not the same as it being live.
            waits = [asyncio.shield(self._confirmed[c]) for c in channels if c in self._confirmed]
            await asyncio.wait_for(asyncio.gather(*waits), SUBSCRIBE_TIMEOUT)
        except (TimeoutError, RedisError, OSError) as exc:
            # As above: the reader re-subscribes on reconnect and the hub catches up.
            log.warning("subscribing to %s not confirmed yet: %s", list(channels), exc or "timeout")

    async def unsubscribe(self, channels: Sequence[str], handler: Handler) -> None:
        gone = []
        for channel in channels:
            handlers = self._handlers.get(channel)
            if handlers and handler in handlers:
                handlers.remove(handler)
                if not handlers:
                    del self._handlers[channel]
                    self._confirmed.pop(channel, None)
                    gone.append(channel)
        if gone and self._pubsub is not None and self._connected.is_set():
            try:
                await self._pubsub.unsubscribe(*gone)
            except (RedisError, OSError) as exc:
                log.warning("unsubscribe from %s failed: %s", gone, exc)

    def _dispatch(self, channel: str, data: bytes) -> None:
        for handler in tuple(self._handlers.get(channel, ())):
            try:
                handler(channel, data)
            except Exception:
                log.exception("bus handler failed on %s", channel)

    async def _read_forever(self) -> None:
        delay = BACKOFF_FIRST
        first = True
        while not self._closing:
            try:
                pending = await self._connect()
                if not first:
                    log.warning("redis bus reconnected")
                    self._notifier = asyncio.create_task(self._notify_reconnected(pending))
                first = False
                delay = BACKOFF_FIRST
                await self._read()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                self._connected.clear()
                if self._closing:
                    return
                log.warning("redis bus connection lost (%s); retrying in %.1fs", exc, delay)
                await self._reset_pubsub()
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, BACKOFF_MAX)
                first = False

    async def _connect(self) -> list[asyncio.Future[None]]:
        """Connect and subscribe to every channel; returns the confirmations to await."""
        assert self._pubsub is not None
        await self._pubsub.connect()  # type: ignore[no-untyped-call]
        channels = list(self._handlers)
        loop = asyncio.get_running_loop()
        pending = []
        for channel in channels:
            # A new link: a channel is in effect again only once Redis confirms it.
            self._confirmed[channel] = future = loop.create_future()
            pending.append(future)
        if channels:
            await self._pubsub.subscribe(*channels)
        else:
            await self._pubsub.ping()
        self._connected.set()
        return pending

    async def _read(self) -> None:
        assert self._pubsub is not None
        pubsub = self._pubsub
        while True:
            message: dict[str, Any] | None = await pubsub.get_message(timeout=None)
            if message is None:
                continue
            kind = message["type"]
            channel = message["channel"]
            if isinstance(channel, bytes):
                channel = channel.decode()
            if kind == "message":
                self._dispatch(channel, message["data"])
            elif kind == "subscribe":
                future = self._confirmed.get(channel)
                if future is not None and not future.done():
                    future.set_result(None)

    async def _reset_pubsub(self) -> None:
        old = self._pubsub
        self._pubsub = self.redis.pubsub()
        if old is not None:
            with contextlib.suppress(Exception):
                await old.aclose()

    async def _notify_reconnected(self, pending: list[asyncio.Future[None]]) -> None:
        # Catching up before the subscriptions are live could miss what is published
        # in between; wait for Redis to confirm them first.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*pending), SUBSCRIBE_TIMEOUT)
        for listener in self._reconnect_listeners:
            try:
                await listener()
            except Exception:
                log.exception("reconnect listener failed")


def as_text(value: object) -> str:
    """Redis replies are bytes unless the client decodes; ids and fields are UTF-8."""
    return value.decode() if isinstance(value, bytes) else str(value)
