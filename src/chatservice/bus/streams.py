"""In-process stream buffer and locks: the embedded defaults, for one instance."""

from __future__ import annotations

import time

from chatservice.bus.base import StreamState


class _Entry:
    __slots__ = ("chunks", "expires", "meta", "session_id", "status")

    def __init__(self, session_id: str, meta: dict[str, str], expires: float) -> None:
        self.session_id = session_id
        self.meta = meta
        self.status = "streaming"
        self.chunks: list[str] = []
        self.expires = expires


class MemoryStreamBuffer:
    def __init__(self, ttl_seconds: float) -> None:
        self.ttl = ttl_seconds
        self._streams: dict[str, _Entry] = {}

    async def open(self, message_id: str, session_id: str, meta: dict[str, str]) -> None:
        self._expire()
        self._streams[message_id] = _Entry(session_id, meta, time.monotonic() + self.ttl)

    async def append(self, message_id: str, text: str) -> None:
        entry = self._streams.get(message_id)
        if entry is not None:
            entry.chunks.append(text)

    async def finish(self, message_id: str, status: str) -> None:
        entry = self._streams.get(message_id)
        if entry is not None:
            entry.status = status

    async def read(self, message_id: str, from_index: int = 0) -> StreamState | None:
        entry = self._streams.get(message_id)
        if entry is None or entry.expires < time.monotonic():
            return None
        start = max(0, from_index)
        return StreamState(
            message_id,
            entry.session_id,
            entry.status,
            dict(entry.meta),
            entry.chunks[start:],
            start,
        )

    async def active(self, session_id: str) -> list[str]:
        now = time.monotonic()
        return [
            mid
            for mid, entry in self._streams.items()
            if entry.session_id == session_id
            and entry.status == "streaming"
            and entry.expires >= now
        ]

    def _expire(self) -> None:
        now = time.monotonic()
        for mid in [m for m, e in self._streams.items() if e.expires < now]:
            del self._streams[mid]


class MemoryLocks:
    def __init__(self) -> None:
        self._held: dict[str, float] = {}

    async def acquire(self, name: str, ttl_seconds: float) -> bool:
        now = time.monotonic()
        if self._held.get(name, 0.0) > now:
            return False
        self._held[name] = now + ttl_seconds
        return True

    async def renew(self, name: str, ttl_seconds: float) -> bool:
        if name not in self._held:
            return False
        self._held[name] = time.monotonic() + ttl_seconds
        return True

    async def release(self, name: str) -> None:
        self._held.pop(name, None)
