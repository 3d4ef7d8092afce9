"""Background jobs, in process: each on its own interval, one instance at a time.

Every instance runs the same loop; before a run it takes the job's lease in `Locks`
(Redis when configured), so with several instances a job still runs once per interval.
The lease is kept for most of an interval after the run starts, not released when the
run ends: an instance whose timer fires a moment later must not run the job again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from chatservice.bus.base import Locks, is_outage

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Job:
    name: str
    interval: float  # seconds
    run: Callable[[], Awaitable[int]]  # returns how many things it did, for the log


class Scheduler:
    def __init__(self, locks: Locks, jobs: list[Job]) -> None:
        self.locks = locks
        self.jobs = jobs
        self._tasks: list[asyncio.Task[None]] = []
        self._renewals: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._loop(job), name=f"job:{job.name}") for job in self.jobs
        ]

    async def stop(self) -> None:
        for task in [*self._tasks, *self._renewals]:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def run_once(self, job: Job) -> int | None:
        """Run `job` if no instance holds its lease; None when another instance has it."""
        lease = f"job:{job.name}"
        ttl = job.interval * 0.9
        if not await self.locks.acquire(lease, ttl):
            return None
        finished = asyncio.Event()
        renewing = asyncio.create_task(self._keep(lease, ttl, finished))
        self._renewals.add(renewing)
        renewing.add_done_callback(self._renewals.discard)
        try:
            return await job.run()
        finally:
            # Not awaited: waiting here could swallow a cancellation meant for this task.
            # The flag ends the renewal even if its cancel is lost inside a Redis call
            # (redis-py's wait_for can drop one on Python 3.11).
            finished.set()
            renewing.cancel()

    async def _loop(self, job: Job) -> None:
        # A random start spreads instances (and jobs) that booted together.
        await asyncio.sleep(job.interval * random.uniform(0.5, 1.0))
        while True:
            try:
                done = await self.run_once(job)
                if done:
                    log.info("job %s: %d done", job.name, done)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the next interval tries again
                if is_outage(exc):
                    log.warning("job %s skipped, a backend is unreachable: %s", job.name, exc)
                else:
                    log.exception("job %s failed", job.name)
            await asyncio.sleep(job.interval)

    async def _keep(self, lease: str, ttl: float, finished: asyncio.Event) -> None:
        # A run longer than its lease (a huge snapshot batch) keeps it until it ends.
        while not finished.is_set():
            await asyncio.sleep(ttl / 3)
            if finished.is_set():
                return
            await self.locks.renew(lease, ttl)
