"""In-process presence: the embedded default, for one instance."""

from __future__ import annotations

import time
from collections.abc import Sequence

from chatservice.bus.base import PresenceEntry


class MemoryPresence:
    def __init__(self, timeout_seconds: float) -> None:
        self.timeout = timeout_seconds
        # session -> conn -> (user, expires at)
        self._sessions: dict[str, dict[str, tuple[str, float]]] = {}

    async def join(self, entry: PresenceEntry) -> bool:
        conns = self._sessions.setdefault(entry.session_id, {})
        conns[entry.conn_id] = (entry.user_id, time.monotonic() + self.timeout)
        return self._live_count(entry.session_id, entry.user_id) == 1

    async def leave(self, entry: PresenceEntry) -> bool:
        conns = self._sessions.get(entry.session_id, {})
        if conns.pop(entry.conn_id, None) is None:
            return False  # already swept
        if not conns:
            self._sessions.pop(entry.session_id, None)
        return self._live_count(entry.session_id, entry.user_id) == 0

    async def refresh(self, entries: Sequence[PresenceEntry]) -> None:
        # An upsert, like the Redis member: a live connection is present, full stop.
        expires = time.monotonic() + self.timeout
        for entry in entries:
            self._sessions.setdefault(entry.session_id, {})[entry.conn_id] = (
                entry.user_id,
                expires,
            )

    async def online(self, session_id: str) -> list[str]:
        now = time.monotonic()
        conns = self._sessions.get(session_id, {})
        return sorted({user for user, expires in conns.values() if expires > now})

    async def user_online(self, user_id: str) -> bool:
        now = time.monotonic()
        return any(
            user == user_id and expires > now
            for conns in self._sessions.values()
            for user, expires in conns.values()
        )

    async def sweep(self) -> list[tuple[str, str]]:
        now = time.monotonic()
        gone: list[tuple[str, str]] = []
        for session_id, conns in list(self._sessions.items()):
            expired = {user for user, expires in conns.values() if expires <= now}
            if not expired:
                continue
            for conn_id, (_, expires) in list(conns.items()):
                if expires <= now:
                    del conns[conn_id]
            still = {user for user, _ in conns.values()}
            gone.extend((session_id, user) for user in sorted(expired - still))
            if not conns:
                del self._sessions[session_id]
        return gone

    def _live_count(self, session_id: str, user_id: str) -> int:
        now = time.monotonic()
        conns = self._sessions.get(session_id, {})
        return sum(1 for user, expires in conns.values() if user == user_id and expires > now)
