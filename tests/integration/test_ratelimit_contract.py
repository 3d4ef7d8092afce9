"""The `RateLimiter` contract (`bus/base.py`), run unchanged against MemoryRateLimiter and
RedisRateLimiter: `limit` sends per rolling minute per key, bursts up to `limit`, and a
refusal says in milliseconds when the next send fits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from chatservice.bus.base import RateLimiter
from tests.conftest import start_redis
from tests.integration.bus_fixtures import MEMBERS, LimiterWorld, unique


@pytest.fixture(params=MEMBERS)
async def world(request: pytest.FixtureRequest) -> AsyncIterator[LimiterWorld]:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    made = LimiterWorld(request.param, url)
    yield made
    await made.aclose()


@pytest.fixture
async def redis_world(redis_url: str) -> AsyncIterator[LimiterWorld]:
    made = LimiterWorld("redis", redis_url)
    yield made
    await made.aclose()


async def exhaust(limiter: RateLimiter, key: str, at_most: int) -> tuple[int, int]:
    """Hit until refused: (hits allowed, the refusal's retry_after in ms)."""
    for allowed in range(at_most + 1):
        wait = await limiter.hit(key)
        if wait is not None:
            return allowed, wait
    raise AssertionError(f"{key}: still allowed after {at_most + 1} hits")


async def test_allows_the_limit_then_refuses_with_the_wait_in_ms(world: LimiterWorld) -> None:
    limiter = world.instance(5)
    key = unique("user")
    results = [await limiter.hit(key) for _ in range(5)]
    assert results == [None] * 5
    wait = await limiter.hit(key)
    # One send fits again every 60 s / 5 = 12 s after the burst started.
    assert isinstance(wait, int)
    assert 11_000 <= wait <= 12_000, wait
    # Still refused, and the wait only shrinks: a refused hit costs nothing.
    again = await limiter.hit(key)
    assert again is not None
    assert 11_000 <= again <= wait


async def test_the_wait_is_about_one_interval(world: LimiterWorld) -> None:
    for per_minute in (60, 120, 1000):
        limiter = world.instance(per_minute)
        key = unique("user")
        started = time.monotonic()
        allowed, wait = await exhaust(limiter, key, 2 * per_minute)
        elapsed_ms = (time.monotonic() - started) * 1000
        interval = 60_000 / per_minute
        # A burst of `limit` (plus what refilled while it ran), then one interval's wait.
        assert per_minute <= allowed <= per_minute + elapsed_ms / interval + 1, allowed
        assert 0 < wait <= interval + 1, (per_minute, wait)


async def test_keys_are_independent(world: LimiterWorld) -> None:
    limiter = world.instance(5)
    alice, bob = unique("alice"), unique("bob")
    allowed, _ = await exhaust(limiter, alice, 10)
    assert allowed == 5
    assert [await limiter.hit(bob) for _ in range(5)] == [None] * 5
    assert await limiter.hit(bob) is not None
    assert await limiter.hit(alice) is not None


async def test_after_waiting_retry_after_the_next_hit_passes(world: LimiterWorld) -> None:
    # One send per second: wide enough that the 20 refused hits below (a Redis round trip
    # each) cannot outlast the wait on a busy machine.
    limiter = world.instance(60)
    key = unique("user")
    _, wait = await exhaust(limiter, key, 120)
    assert 0 < wait <= 1001
    # Hammering while refused does not push the next slot back.
    for _ in range(20):
        assert await limiter.hit(key) is not None
    await asyncio.sleep(wait / 1000 + 0.01)
    assert await limiter.hit(key) is None
    # Only one slot came back: the next one is refused again, about one interval away.
    wait = await limiter.hit(key)
    assert wait is not None
    assert 500 <= wait <= 1001


async def test_budget_refills_at_the_configured_rate(world: LimiterWorld) -> None:
    limiter = world.instance(600)
    key = unique("user")
    await exhaust(limiter, key, 1200)
    await asyncio.sleep(0.55)  # five and a half intervals
    refilled, _ = await exhaust(limiter, key, 20)
    assert 4 <= refilled <= 6, refilled


# -- Redis: one budget across instances ----------------------------------------------------


async def test_redis_instances_share_one_budget(redis_world: LimiterWorld) -> None:
    one, two = redis_world.instance(5), redis_world.instance(5)
    key = unique("user")
    assert [await one.hit(key) for _ in range(3)] == [None] * 3
    assert [await two.hit(key) for _ in range(2)] == [None] * 2
    refused_one, refused_two = await one.hit(key), await two.hit(key)
    assert refused_one is not None
    assert refused_two is not None
    assert 11_000 <= refused_two <= 12_000


async def test_redis_concurrent_hits_from_instances_never_exceed_the_limit(
    redis_world: LimiterWorld,
) -> None:
    limiters = [redis_world.instance(20) for _ in range(4)]
    key = unique("user")
    results = await asyncio.gather(*(limiters[i % 4].hit(key) for i in range(80)))
    assert sum(1 for r in results if r is None) == 20


async def test_redis_limiter_fails_open_while_redis_is_down(tmp_path: Path) -> None:
    redis = start_redis(tmp_path / "redis")
    world = LimiterWorld("redis", redis.url)
    try:
        limiter = world.instance(1)
        key = unique("user")
        assert await limiter.hit(key) is None
        assert await limiter.hit(key) is not None
        redis.kill()
        assert await asyncio.wait_for(limiter.hit(key), 10) is None
        redis.start()
        # Back: the limit holds again (the first command on a dead pooled connection may
        # still fail open, so each try uses a fresh key).
        deadline = time.monotonic() + 5
        while True:
            allowed, wait = await exhaust(limiter, unique("user"), 3)
            if allowed == 1:
                break
            assert time.monotonic() < deadline, (allowed, wait)
            await asyncio.sleep(0.1)
        assert 59_000 <= wait <= 60_000
    finally:
        await world.aclose()
        redis.stop()
