"""Typing indicators: published, never stored, throttled, and never left on.

The instance that publishes a user's "typing" owns that indicator: it expires it with a
"stopped" of its own when no refresh came for `TYPING_TTL` (a client that went quiet, a
tab put to sleep). A client's own "stopped" is always published, whichever instance it
reaches — the user may have started typing on another device, through another instance —
throttled only against repeating itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from chatservice import events
from chatservice.publisher import Publisher

log = logging.getLogger(__name__)

# A client may report typing on every keystroke; others need at most one refresh a second.
REFRESH_SECONDS = 1.0
# An indicator nobody refreshed for this long is turned off by its owner.
TYPING_TTL = 6.0


class TypingService:
    def __init__(self, publisher: Publisher, ttl: float = TYPING_TTL) -> None:
        self.publisher = publisher
        self.ttl = ttl
        # (session, user) -> when this instance last published their typing=True
        self._typing: dict[tuple[str, str], float] = {}
        # (session, user) -> when this instance last published their typing=False
        self._stopped: dict[tuple[str, str], float] = {}
        self._expiry: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self._expiring: set[asyncio.Task[None]] = set()

    async def set_typing(self, session_id: str, user_id: str, is_typing: bool) -> bool:
        """Publish the state unless it would repeat itself within a second; returns whether
        it published."""
        key = (session_id, user_id)
        now = time.monotonic()
        if is_typing:
            self._arm(key)
            last = self._typing.get(key)
            if last is not None and now - last < REFRESH_SECONDS:
                return False
            self._typing[key] = now
            self._stopped.pop(key, None)
        else:
            self._disarm(key)
            if len(self._stopped) > 4096:  # only the last second's stops matter
                self._stopped = {
                    k: t for k, t in self._stopped.items() if now - t < REFRESH_SECONDS
                }
            was_typing_here = self._typing.pop(key, None) is not None
            last = self._stopped.get(key)
            if not was_typing_here and last is not None and now - last < REFRESH_SECONDS:
                return False
            self._stopped[key] = now
        await self._publish(session_id, user_id, is_typing)
        return True

    async def stopped(self, session_id: str, user_id: str) -> None:
        """The user's connection went away: clear an indicator this instance left on."""
        if (session_id, user_id) in self._typing:
            await self.set_typing(session_id, user_id, False)

    async def close(self) -> None:
        for handle in self._expiry.values():
            handle.cancel()
        self._expiry.clear()
        for task in list(self._expiring):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _arm(self, key: tuple[str, str]) -> None:
        self._disarm(key)
        loop = asyncio.get_running_loop()
        self._expiry[key] = loop.call_later(self.ttl, self._expire, key)

    def _disarm(self, key: tuple[str, str]) -> None:
        handle = self._expiry.pop(key, None)
        if handle is not None:
            handle.cancel()

    def _expire(self, key: tuple[str, str]) -> None:
        self._expiry.pop(key, None)
        if self._typing.pop(key, None) is None:
            return
        self._stopped[key] = time.monotonic()
        task = asyncio.create_task(self._publish_expiry(*key))
        self._expiring.add(task)
        task.add_done_callback(self._expiring.discard)

    async def _publish_expiry(self, session_id: str, user_id: str) -> None:
        with contextlib.suppress(Exception):  # logged by _publish; nobody awaits a timer
            await self._publish(session_id, user_id, False)

    async def _publish(self, session_id: str, user_id: str, is_typing: bool) -> None:
        try:
            await self.publisher.publish(events.typing_event(session_id, user_id, is_typing))
        except Exception:
            if not is_typing:  # an indicator the others may keep showing: say so
                log.warning("could not publish typing stop for %s in %s", user_id, session_id)
            raise
