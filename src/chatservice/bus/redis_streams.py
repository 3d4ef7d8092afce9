"""Stream buffers and locks in Redis, so any instance can resume or cancel an answer.

`chat:stream:{message_id}`          hash: session_id, status, sender_id, reply_to, …
`chat:stream:{message_id}:chunks`   list: the chunks so far, in index order
`chat:streams:active:{session_id}`  set: message ids of the session's answers in progress
`lock:{name}`                       string: the instance holding a lease
All expire after STREAM_BUFFER_TTL (2 h by default); leases after their own TTL.
"""

from __future__ import annotations

import uuid

from redis.asyncio import Redis

from chatservice.bus.base import StreamState
from chatservice.bus.redis import as_text

# Delete / extend a lease only if we still hold it (a lapsed lease may be someone else's).
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


def _meta_key(message_id: str) -> str:
    return f"chat:stream:{message_id}"


def _chunks_key(message_id: str) -> str:
    return f"chat:stream:{message_id}:chunks"


def _active_key(session_id: str) -> str:
    return f"chat:streams:active:{session_id}"


class RedisStreamBuffer:
    def __init__(self, redis: Redis, ttl_seconds: float) -> None:
        self.redis = redis
        self.ttl = int(ttl_seconds)

    async def open(self, message_id: str, session_id: str, meta: dict[str, str]) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            fields = dict(meta)
            fields.update(session_id=session_id, status="streaming")
            pipe.hset(_meta_key(message_id), mapping=fields)  # type: ignore[arg-type]
            pipe.expire(_meta_key(message_id), self.ttl)
            pipe.delete(_chunks_key(message_id))
            pipe.sadd(_active_key(session_id), message_id)
            pipe.expire(_active_key(session_id), self.ttl)
            await pipe.execute()

    async def append(self, message_id: str, text: str) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.rpush(_chunks_key(message_id), text)
            pipe.expire(_chunks_key(message_id), self.ttl)
            await pipe.execute()

    async def finish(self, message_id: str, status: str) -> None:
        session_id = await self.redis.hget(_meta_key(message_id), "session_id")
        if session_id is None:
            return  # expired or never opened: don't create a record without a session
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(_meta_key(message_id), "status", status)
            pipe.expire(_meta_key(message_id), self.ttl)
            pipe.srem(_active_key(as_text(session_id)), message_id)
            await pipe.execute()

    async def read(self, message_id: str, from_index: int = 0) -> StreamState | None:
        start = max(0, from_index)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(_meta_key(message_id))
            pipe.lrange(_chunks_key(message_id), start, -1)
            raw_meta, raw_chunks = await pipe.execute()
        if not raw_meta:
            return None
        meta = {as_text(k): as_text(v) for k, v in raw_meta.items()}
        return StreamState(
            message_id,
            meta.pop("session_id", ""),
            meta.pop("status", "streaming"),
            meta,
            [as_text(c) for c in raw_chunks],
            start,
        )

    async def active(self, session_id: str) -> list[str]:
        members = sorted(as_text(m) for m in await self.redis.smembers(_active_key(session_id)))
        if not members:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for message_id in members:
                pipe.hget(_meta_key(message_id), "status")
            statuses = await pipe.execute()
        stale = [m for m, status in zip(members, statuses, strict=True) if status is None]
        if stale:  # expired answers of a session that kept its set alive
            await self.redis.srem(_active_key(session_id), *stale)
        return [
            m
            for m, status in zip(members, statuses, strict=True)
            if status is not None and as_text(status) == "streaming"
        ]


class RedisLocks:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.owner = uuid.uuid4().hex  # this process
        self._release = redis.register_script(_RELEASE)
        self._renew = redis.register_script(_RENEW)

    async def acquire(self, name: str, ttl_seconds: float) -> bool:
        return bool(
            await self.redis.set(f"lock:{name}", self.owner, nx=True, px=int(ttl_seconds * 1000))
        )

    async def renew(self, name: str, ttl_seconds: float) -> bool:
        return bool(
            await self._renew(keys=[f"lock:{name}"], args=[self.owner, int(ttl_seconds * 1000)])
        )

    async def release(self, name: str) -> None:
        await self._release(keys=[f"lock:{name}"], args=[self.owner])
