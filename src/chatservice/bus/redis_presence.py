"""Presence in Redis, shared by every instance (the key names of the A2G-compatible REST
contract).

`ws:sessions:{session_id}`  sorted set: member "user_id\\nconn_id", score = expiry (ms);
                            the key itself lives twice as long, so the sweeper still
                            finds expired members and announces who left.
                            The user ids with a live member are the session's online users.
`ws:connections:{user_id}`  hash: conn_id -> {session_id, instance, connected_at, last_ping}.
`ws:presence:index`         set of session ids that have entries (what the sweeper visits).

Each instance refreshes its own connections every heartbeat; a crashed instance stops
refreshing, its entries pass their expiry, and whichever instance holds the sweeper
lock removes them and announces `user_left` for users left with no connection.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime

import orjson
from redis.asyncio import Redis

from chatservice.bus.base import PresenceEntry
from chatservice.bus.redis import as_text
from chatservice.domain import isoformat, utcnow

INDEX_KEY = "ws:presence:index"
SWEEP_LOCK_KEY = "ws:presence:sweeper"

# Counts the user's live members after adding or removing one; ARGV[1] = op (join/leave).
_CHANGE = """
local zkey, hkey, index = KEYS[1], KEYS[2], KEYS[3]
local op, member, expiry, now, prefix, conn, info, ttl, session =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9]
if op == 'join' then
  redis.call('ZADD', zkey, expiry, member)
  redis.call('PEXPIRE', zkey, 2 * ttl)
  redis.call('HSET', hkey, conn, info)
  redis.call('PEXPIRE', hkey, ttl)
  redis.call('SADD', index, session)
else
  redis.call('HDEL', hkey, conn)
  if redis.call('ZREM', zkey, member) == 0 then return -1 end
end
local n = 0
for _, m in ipairs(redis.call('ZRANGEBYSCORE', zkey, now, '+inf')) do
  if string.sub(m, 1, #prefix) == prefix then n = n + 1 end
end
return n
"""

# Removes expired members of one session; returns users left with no live member.
_SWEEP = """
local zkey, index, now, session = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
local expired = redis.call('ZRANGEBYSCORE', zkey, '-inf', '(' .. now)
if #expired > 0 then redis.call('ZREMRANGEBYSCORE', zkey, '-inf', '(' .. now) end
local live = {}
for _, m in ipairs(redis.call('ZRANGE', zkey, 0, -1)) do
  live[string.match(m, '^(.-)\\n')] = true
end
if next(live) == nil then redis.call('SREM', index, session) end
local gone, seen = {}, {}
for _, m in ipairs(expired) do
  local user = string.match(m, '^(.-)\\n')
  if not live[user] and not seen[user] then
    seen[user] = true
    table.insert(gone, user)
  end
end
return gone
"""


def _zkey(session_id: str) -> str:
    return f"ws:sessions:{session_id}"


def _hkey(user_id: str) -> str:
    return f"ws:connections:{user_id}"


def _member(entry: PresenceEntry) -> str:
    return f"{entry.user_id}\n{entry.conn_id}"


class RedisPresence:
    def __init__(self, redis: Redis, timeout_seconds: float, instance_id: str) -> None:
        self.redis = redis
        self.ttl_ms = int(timeout_seconds * 1000)
        self.instance_id = instance_id
        self._change = redis.register_script(_CHANGE)
        self._sweep = redis.register_script(_SWEEP)

    async def join(self, entry: PresenceEntry) -> bool:
        now = _now_ms()
        info = orjson.dumps(
            {
                "session_id": entry.session_id,
                "instance": self.instance_id,
                "connected_at": isoformat(utcnow()),
                "last_ping": isoformat(utcnow()),
            }
        )
        count = await self._change(
            keys=[_zkey(entry.session_id), _hkey(entry.user_id), INDEX_KEY],
            args=[
                "join",
                _member(entry),
                now + self.ttl_ms,
                now,
                f"{entry.user_id}\n",
                entry.conn_id,
                info,
                self.ttl_ms,
                entry.session_id,
            ],
        )
        return int(count) == 1

    async def leave(self, entry: PresenceEntry) -> bool:
        now = _now_ms()
        count = await self._change(
            keys=[_zkey(entry.session_id), _hkey(entry.user_id), INDEX_KEY],
            args=[
                "leave",
                _member(entry),
                0,
                now,
                f"{entry.user_id}\n",
                entry.conn_id,
                "",
                self.ttl_ms,
                entry.session_id,
            ],
        )
        return int(count) == 0

    async def refresh(self, entries: Sequence[PresenceEntry]) -> None:
        if not entries:
            return
        now = _now_ms()
        last_ping = isoformat(utcnow())
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry in entries:
                zkey, hkey = _zkey(entry.session_id), _hkey(entry.user_id)
                # An upsert, not XX: after a Redis restart (nothing persisted) the next
                # heartbeat puts this instance's connections back.
                pipe.zadd(zkey, {_member(entry): now + self.ttl_ms})
                pipe.pexpire(zkey, 2 * self.ttl_ms)
                pipe.sadd(INDEX_KEY, entry.session_id)
                pipe.hset(
                    hkey,
                    entry.conn_id,
                    orjson.dumps(
                        {
                            "session_id": entry.session_id,
                            "instance": self.instance_id,
                            "last_ping": last_ping,
                        }
                    ),
                )
                pipe.pexpire(hkey, self.ttl_ms)
            await pipe.execute()

    async def online(self, session_id: str) -> list[str]:
        members = await self.redis.zrangebyscore(_zkey(session_id), _now_ms(), "+inf")
        return sorted({as_text(m).split("\n", 1)[0] for m in members})

    async def user_online(self, user_id: str) -> bool:
        # Fields of a crashed instance stay in the hash until the key expires (it lives
        # as long as the user's freshest connection): go by each field's last ping.
        fresh_after = _now_ms() - self.ttl_ms
        for raw in await self.redis.hvals(_hkey(user_id)):
            try:
                pinged = datetime.fromisoformat(orjson.loads(raw)["last_ping"])
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
            if pinged.timestamp() * 1000 >= fresh_after:
                return True
        return False

    async def sweep(self) -> list[tuple[str, str]]:
        # One sweeper at a time across instances; the lock lapses by itself.
        if not await self.redis.set(SWEEP_LOCK_KEY, self.instance_id, nx=True, px=1000):
            return []
        now = _now_ms()
        gone: list[tuple[str, str]] = []
        for raw in await self.redis.smembers(INDEX_KEY):
            session_id = as_text(raw)
            users = await self._sweep(keys=[_zkey(session_id), INDEX_KEY], args=[now, session_id])
            gone.extend((session_id, u.decode()) for u in users)
        return gone


def _now_ms() -> int:
    return int(time.time() * 1000)
