"""A lease held for as long as work runs under it, and given up the moment it may be lost.

An instance answers a session's questions only while it holds the session's agent lease.
A lease renewed in the background can still be lost: the renewal finds another owner
(this instance stalled past the lease and another took over), or renewals kept failing
until the lease ran out. Either way the work must stop, or two instances answer the same
question; `lost` is set and the owner's callback cuts the work short.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from chatservice.bus.base import Locks

log = logging.getLogger(__name__)


class HeldLease:
    def __init__(self, locks: Locks, name: str, ttl: float, on_lost: Callable[[], None]) -> None:
        self.locks = locks
        self.name = name
        self.ttl = ttl
        self.lost = False
        self._on_lost = on_lost
        self._renewer: asyncio.Task[None] | None = None

    def keep(self) -> None:
        """Renew the (just acquired) lease every third of its time until `stop`."""
        self._renewer = asyncio.create_task(self._renew_forever(), name=f"lease-{self.name}")

    async def stop(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer

    async def _renew_forever(self) -> None:
        loop = asyncio.get_running_loop()
        valid_until = loop.time() + self.ttl
        while True:
            await asyncio.sleep(self.ttl / 3)
            asked = loop.time()
            # A stall longer than what was left of the lease (the event loop blocked, the
            # process stopped): another instance may own it now, whatever Redis answers.
            if asked >= valid_until:
                self._lose("the lease ran out before it could be renewed")
                return
            try:
                renewed = await self.locks.renew(self.name, self.ttl)
            except Exception as exc:  # an outage: keep trying while the lease lasts
                log.warning("renewing lease %s failed: %s", self.name, exc)
                continue
            if not renewed:
                self._lose("another instance holds the lease")
                return
            valid_until = asked + self.ttl

    def _lose(self, why: str) -> None:
        log.warning("lost lease %s: %s; stopping the work under it", self.name, why)
        self.lost = True
        self._on_lost()
