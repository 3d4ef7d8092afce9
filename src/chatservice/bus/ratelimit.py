"""Per-user send budgets with GCRA (generic cell rate algorithm), in-process.

GCRA keeps one number per key, the "theoretical arrival time", and allows `limit` sends
in any rolling minute with bursts up to `limit`: the same rule the Redis limiter runs
atomically in Lua, so one instance and many behave alike.
"""

from __future__ import annotations

import time

WINDOW_MS = 60_000


def gcra(tat_ms: float, now_ms: float, limit: int) -> tuple[float, int | None]:
    """(new theoretical arrival time, None) when allowed, else (unchanged, wait in ms)."""
    interval = WINDOW_MS / limit
    new_tat = max(tat_ms, now_ms) + interval
    allowed_at = new_tat - WINDOW_MS
    if now_ms < allowed_at:
        return tat_ms, max(1, int(allowed_at - now_ms + 0.999))
    return new_tat, None


class MemoryRateLimiter:
    def __init__(self, per_minute: int) -> None:
        self.limit = per_minute
        self._tat: dict[str, float] = {}

    async def hit(self, key: str) -> int | None:
        now = time.monotonic() * 1000
        tat, wait = gcra(self._tat.get(key, 0.0), now, self.limit)
        if wait is None:
            self._tat[key] = tat
            if len(self._tat) > 100_000:  # forget keys whose budget is full again
                self._tat = {k: v for k, v in self._tat.items() if v > now}
        return wait
