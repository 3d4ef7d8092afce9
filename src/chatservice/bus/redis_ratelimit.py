"""Per-user send budgets in Redis: GCRA in one Lua script, so it is atomic across
instances and uses Redis's own clock (instances' clocks may differ)."""

from __future__ import annotations

import logging

from redis.asyncio import Redis
from redis.exceptions import RedisError

from chatservice.bus.ratelimit import WINDOW_MS

log = logging.getLogger(__name__)

_GCRA = """
local key, limit, window = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local interval = window / limit
local tat = tonumber(redis.call('GET', key) or '0')
local new_tat = math.max(tat, now) + interval
local allowed_at = new_tat - window
if now < allowed_at then
  return math.max(1, math.ceil(allowed_at - now))
end
redis.call('SET', key, tostring(new_tat), 'PX', math.ceil(new_tat - now))
return 0
"""


class RedisRateLimiter:
    """Keys are `ratelimit:{user_id}`; each lives only as long as its budget is short."""

    def __init__(self, redis: Redis, per_minute: int) -> None:
        self.limit = per_minute
        self._script = redis.register_script(_GCRA)

    async def hit(self, key: str) -> int | None:
        try:
            wait = int(await self._script(keys=[f"ratelimit:{key}"], args=[self.limit, WINDOW_MS]))
        except (RedisError, OSError) as exc:
            # Fail open: a Redis outage must not stop people from chatting.
            log.warning("rate limiter unavailable (%s); allowing the send", exc)
            return None
        return wait or None
