"""The scheduler: several instances share a job through leases in `Locks` (in process, and in
a real Redis of the tests' own), so a job runs once per interval, never twice at a time."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from redis.asyncio import Redis

from chatservice.bus.base import Locks
from chatservice.bus.redis_streams import RedisLocks
from chatservice.bus.streams import MemoryLocks
from chatservice.services.scheduler import Job, Scheduler

INTERVAL = 0.2
RUN_FOR = 1.5
WORK = 0.05  # how long one run of the test job takes


@dataclass
class Instances:
    """Locks for N scheduler instances: the same object (one process) or, with Redis, one
    RedisLocks per instance (separate processes, each its own lease owner)."""

    make: Callable[[], Locks]


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[Redis]:
    # Without a socket timeout: with one, redis-py sends through asyncio.wait_for, which on
    # Python 3.11 can lose a cancellation (test_a_lost_cancellation_... shows what that does
    # to the scheduler); the other tests are about leases, not that.
    client = Redis.from_url(redis_url, socket_timeout=None)
    yield client
    await client.aclose()


@pytest.fixture(params=["memory", "redis-shared", "redis-separate"])
def instances(request: pytest.FixtureRequest) -> Instances:
    if request.param == "memory":
        shared: Locks = MemoryLocks()
        return Instances(lambda: shared)
    client = request.getfixturevalue("redis_client")
    if request.param == "redis-shared":
        one = RedisLocks(client)
        return Instances(lambda: one)
    return Instances(lambda: RedisLocks(client))


@dataclass
class Recorder:
    """A job body that records when each run started and ended, and by which instance."""

    work: float = WORK
    fail: bool = False
    active: int = 0
    most_active: int = 0
    runs: list[tuple[str, float, float]] = field(default_factory=list)
    cancelled: int = 0

    def job(self, name: str, instance: str, interval: float = INTERVAL) -> Job:
        async def run() -> int:
            loop = asyncio.get_running_loop()
            start = loop.time()
            self.active += 1
            self.most_active = max(self.most_active, self.active)
            try:
                await asyncio.sleep(self.work)
                if self.fail:
                    raise RuntimeError("the job failed")
                return 1
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
            finally:
                self.active -= 1
                self.runs.append((instance, start, loop.time()))

        return Job(name, interval, run)

    def starts(self) -> list[float]:
        return sorted(start for _, start, _ in self.runs)


async def stop(*schedulers: Scheduler) -> None:
    """Stop the schedulers. A stop that lands while a run is finishing is lost (the bug that
    test_stop_as_a_run_finishes shows), and stop() would then wait forever: cancel the
    loops once more after a second so that only that test fails on it."""
    tasks = [t for t in asyncio.all_tasks() if t.get_name().startswith("job:")]
    rescue = asyncio.get_running_loop().call_later(1.0, lambda: [t.cancel() for t in tasks])
    try:
        for scheduler in schedulers:
            await scheduler.stop()
    finally:
        rescue.cancel()


def job_name() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"  # Redis outlives the test: a lease of its own


async def run_two(instances: Instances, recorder: Recorder, seconds: float) -> float:
    """Two scheduler instances with the same job for `seconds`; returns the time they ran."""
    name = job_name()
    first = Scheduler(instances.make(), [recorder.job(name, "a")])
    second = Scheduler(instances.make(), [recorder.job(name, "b")])
    loop = asyncio.get_running_loop()
    began = loop.time()
    await first.start()
    await second.start()
    try:
        await asyncio.sleep(seconds)
    finally:
        await stop(first, second)
    return loop.time() - began


async def test_two_instances_run_a_job_once_per_interval(instances: Instances) -> None:
    recorder = Recorder()
    elapsed = await run_two(instances, recorder, RUN_FOR)
    runs = len(recorder.runs)
    expected = elapsed / INTERVAL  # 7.5; two unco-ordinated instances would make ~12
    assert 0.6 * expected <= runs <= 1.25 * expected, recorder.runs
    assert recorder.most_active == 1
    starts = recorder.starts()
    ends = sorted(end for _, _, end in recorder.runs)
    # Never overlapping: each run ends before the next one starts ...
    assert all(end <= start for end, start in zip(ends, starts[1:], strict=False))
    # ... and the lease (90 % of the interval) keeps runs apart even across instances.
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    assert min(gaps) >= 0.85 * INTERVAL, gaps


async def test_a_long_run_keeps_its_lease(instances: Instances) -> None:
    """A run three intervals long: the other instance's timer fires meanwhile and must
    find the lease still held (renewed while the run goes on)."""
    recorder = Recorder(work=3 * INTERVAL)
    await run_two(instances, recorder, 2.0)
    assert recorder.most_active == 1
    runs = sorted(recorder.runs, key=lambda run: run[1])
    assert len(runs) >= 2
    for (_, _, end), (_, start, _) in itertools.pairwise(runs):
        assert end <= start


async def test_a_failing_job_is_retried_every_interval(instances: Instances) -> None:
    recorder = Recorder(fail=True)
    elapsed = await run_two(instances, recorder, 1.0)
    expected = elapsed / INTERVAL
    assert 0.5 * expected <= len(recorder.runs) <= 1.25 * expected, recorder.runs
    assert recorder.most_active == 1


async def test_a_job_that_fails_once_runs_again(instances: Instances) -> None:
    calls: list[float] = []

    async def flaky() -> int:
        calls.append(asyncio.get_running_loop().time())
        if len(calls) == 1:
            raise RuntimeError("first run fails")
        return 1

    scheduler = Scheduler(instances.make(), [Job(job_name(), INTERVAL, flaky)])
    await scheduler.start()
    try:
        for _ in range(100):
            if len(calls) >= 3:
                break
            await asyncio.sleep(0.02)
    finally:
        await stop(scheduler)
    assert len(calls) >= 3
    assert calls[1] - calls[0] >= 0.85 * INTERVAL


async def test_stop_cancels_a_run_in_progress_and_nothing_runs_after(
    instances: Instances,
) -> None:
    recorder = Recorder(work=30.0)  # would outlast the test by far
    scheduler = Scheduler(instances.make(), [recorder.job(job_name(), "a", interval=0.05)])
    await scheduler.start()
    for _ in range(100):
        if recorder.active:
            break
        await asyncio.sleep(0.01)
    assert recorder.active == 1
    loop = asyncio.get_running_loop()
    began = loop.time()
    await scheduler.stop()
    assert loop.time() - began < 1.0
    assert (recorder.active, recorder.cancelled, len(recorder.runs)) == (0, 1, 1)
    await asyncio.sleep(0.2)
    assert len(recorder.runs) == 1
    await scheduler.stop()  # a second stop is harmless
    tasks = [t for t in asyncio.all_tasks() if t.get_name().startswith("job:")]
    assert tasks == []


async def test_stop_between_runs(instances: Instances) -> None:
    recorder = Recorder(work=0.0)
    scheduler = Scheduler(instances.make(), [recorder.job(job_name(), "a", interval=0.05)])
    await scheduler.start()
    for _ in range(100):
        if len(recorder.runs) >= 2:
            break
        await asyncio.sleep(0.01)
    await stop(scheduler)
    done = len(recorder.runs)
    assert done >= 2
    await asyncio.sleep(0.2)
    assert len(recorder.runs) == done
    assert recorder.cancelled == 0


async def test_run_once_yields_to_the_lease_holder(instances: Instances) -> None:
    recorder = Recorder(work=0.0)
    name = job_name()
    first = Scheduler(instances.make(), [])
    second = Scheduler(instances.make(), [])
    job = recorder.job(name, "a", interval=0.5)
    assert await first.run_once(job) == 1
    assert await second.run_once(recorder.job(name, "b", interval=0.5)) is None
    assert await first.run_once(job) is None  # the lease is kept after the run, too
    assert [instance for instance, _, _ in recorder.runs] == ["a"]
    # Another job has a lease of its own.
    assert await second.run_once(recorder.job(job_name(), "b", interval=0.5)) == 1
    # Once the lease (90 % of the interval) lapses, whoever comes first runs it.
    await asyncio.sleep(0.5)
    assert await second.run_once(recorder.job(name, "b", interval=0.5)) == 1
    assert [instance for instance, _, _ in recorder.runs] == ["a", "b", "b"]


async def test_run_once_while_another_run_is_in_progress(instances: Instances) -> None:
    recorder = Recorder(work=0.4)
    name = job_name()
    first = Scheduler(instances.make(), [])
    second = Scheduler(instances.make(), [])
    running = asyncio.create_task(first.run_once(recorder.job(name, "a", interval=0.1)))
    await asyncio.sleep(0.2)  # past the lease's own TTL (0.09 s): only renewal holds it
    assert recorder.active == 1
    assert await second.run_once(recorder.job(name, "b", interval=0.1)) is None
    assert await running == 1
    assert [instance for instance, _, _ in recorder.runs] == ["a"]


async def test_stop_as_a_run_finishes() -> None:
    ran = asyncio.Event()
    runs = 0

    async def quick() -> int:
        nonlocal runs
        runs += 1
        ran.set()
        return 1

    scheduler = Scheduler(MemoryLocks(), [Job(job_name(), 0.05, quick)])
    await scheduler.start()
    await ran.wait()  # wakes the test in the same loop turn as the run's clean-up
    loop = asyncio.get_running_loop()
    began = loop.time()
    await stop(scheduler)  # rescued after 1 s if the stop was lost
    assert loop.time() - began < 0.5
    assert runs == 1


class SignallingLocks:
    """RedisLocks that say when a renewal starts (an observer, not a fake)."""

    def __init__(self, inner: RedisLocks) -> None:
        self.inner = inner
        self.renewing = asyncio.Event()
        self.renewals = 0

    async def acquire(self, name: str, ttl_seconds: float) -> bool:
        return await self.inner.acquire(name, ttl_seconds)

    async def renew(self, name: str, ttl_seconds: float) -> bool:
        self.renewals += 1
        self.renewing.set()
        return await self.inner.renew(name, ttl_seconds)

    async def release(self, name: str) -> None:
        await self.inner.release(name)


async def test_a_lost_cancellation_does_not_keep_the_lease_forever(redis_url: str) -> None:
    # The client as app.py builds it: redis-py's default socket timeout (5 s).
    client = Redis.from_url(redis_url)
    locks = SignallingLocks(RedisLocks(client))

    async def until_a_renewal_starts() -> int:
        await locks.renewing.wait()  # the run ends while the renewal is being sent
        return 1

    scheduler = Scheduler(locks, [])
    job = Job(job_name(), 0.15, until_a_renewal_starts)
    running = asyncio.create_task(scheduler.run_once(job))
    try:
        done, _ = await asyncio.wait([running], timeout=1.0)
        renewals = locks.renewals
        await asyncio.sleep(0.2)
        assert done, "run_once() did not return"
        assert locks.renewals == renewals, "the lease is still being renewed after the run"
    finally:
        for task in asyncio.all_tasks():
            if task.get_coro().__qualname__ == "Scheduler._keep":  # type: ignore[union-attr]
                task.cancel()
        await asyncio.wait([running], timeout=1.0)
        await client.aclose()


async def test_an_outage_is_a_warning_and_a_bug_is_an_error(
    instances: Instances, caplog: pytest.LogCaptureFixture
) -> None:
    """A backend out of reach (Redis restarting) is expected and retried: one warning line,
    no traceback; any other exception is logged as an error with its traceback."""
    calls: list[str] = []

    async def unreachable() -> int:
        calls.append("outage")
        raise ConnectionRefusedError("connection refused")

    async def buggy() -> int:
        calls.append("bug")
        raise KeyError("bug")

    scheduler = Scheduler(
        instances.make(),
        [Job(job_name(), INTERVAL, unreachable), Job(job_name(), INTERVAL, buggy)],
    )
    with caplog.at_level("WARNING", logger="chatservice.services.scheduler"):
        await scheduler.start()
        try:
            for _ in range(200):
                if {"outage", "bug"} <= set(calls):
                    break
                await asyncio.sleep(0.02)
        finally:
            await stop(scheduler)
    records = [r for r in caplog.records if r.name == "chatservice.services.scheduler"]
    outages = [r for r in records if "unreachable" in r.getMessage()]
    bugs = [r for r in records if "failed" in r.getMessage()]
    assert outages and all(r.levelname == "WARNING" and not r.exc_info for r in outages)
    assert bugs and all(r.levelname == "ERROR" and r.exc_info for r in bugs)
