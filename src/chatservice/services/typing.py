"""Typing indicators: published, never stored, and throttled per user and session."""

from __future__ import annotations

import time

from chatservice import events
from chatservice.bus.base import Bus

# A client may report typing on every keystroke; others need at most one refresh a second.
REFRESH_SECONDS = 1.0


class TypingService:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._last: dict[tuple[str, str], tuple[bool, float]] = {}

    async def set_typing(self, session_id: str, user_id: str, is_typing: bool) -> bool:
        """Publish the state if it changed or needs a refresh; returns whether it published."""
        key = (session_id, user_id)
        now = time.monotonic()
        previous = self._last.get(key)
        if (
            previous is not None
            and previous[0] == is_typing
            and (not is_typing or now - previous[1] < REFRESH_SECONDS)
        ):
            return False
        if is_typing:
            self._last[key] = (True, now)
        else:
            self._last.pop(key, None)
            if previous is None:
                return False  # nobody was told this user was typing
        event = events.typing_event(session_id, user_id, is_typing)
        await self.bus.publish(events.typing_channel(session_id), events.encode(event))
        return True

    async def stopped(self, session_id: str, user_id: str) -> None:
        """The user's connection went away: clear an indicator left on."""
        if (session_id, user_id) in self._last:
            await self.set_typing(session_id, user_id, False)
