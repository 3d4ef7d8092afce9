"""The `StreamBuffer` and `Locks` contracts (`bus/base.py`), run unchanged against the
memory members (`bus/streams.py`) and the Redis members (`bus/redis_streams.py`).

A "world" is what several instances of the service share: for the memory members the
one process (every "instance" is the same object), for the Redis members one Redis
server (every instance is a new object with its own client, as two `chat-service serve`
processes would have). Tests about *who* holds a lease need two distinct holders, which
only exist across processes: they run against two RedisLocks objects on one server.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from chatservice.bus.base import Locks, StreamBuffer
from chatservice.bus.redis_streams import RedisLocks, RedisStreamBuffer
from chatservice.bus.streams import MemoryLocks, MemoryStreamBuffer
from tests.integration.bus_fixtures import MEMBERS, redis_client, unique

TTL = 7200.0  # the default STREAM_BUFFER_TTL
SHORT_TTL = 1.0  # Redis expiry has whole-second resolution here (EXPIRE seconds)


class StreamWorld:
    """Stream buffers and locks of several instances sharing one medium."""

    def __init__(self, kind: str, redis_url: str | None = None) -> None:
        self.kind = kind
        self.redis_url = redis_url
        self._buffers: dict[float, MemoryStreamBuffer] = {}
        self._locks: MemoryLocks | None = None
        self._clients: list[Redis] = []

    def client(self) -> Redis:
        assert self.redis_url is not None
        made = redis_client(self.redis_url)
        self._clients.append(made)
        return made

    def buffer(self, ttl: float = TTL) -> StreamBuffer:
        """Another instance's buffer (memory: the process's one buffer with this TTL)."""
        if self.kind == "memory":
            return self._buffers.setdefault(ttl, MemoryStreamBuffer(ttl))
        return RedisStreamBuffer(self.client(), ttl)

    def locks(self) -> Locks:
        if self.kind == "memory":
            if self._locks is None:
                self._locks = MemoryLocks()
            return self._locks
        return RedisLocks(self.client())

    async def aclose(self) -> None:
        for made in self._clients:
            await made.aclose()


@pytest.fixture(params=MEMBERS)
async def world(request: pytest.FixtureRequest) -> AsyncIterator[StreamWorld]:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    made = StreamWorld(request.param, url)
    yield made
    await made.aclose()


@pytest.fixture
async def redis_world(redis_url: str) -> AsyncIterator[StreamWorld]:
    made = StreamWorld("redis", redis_url)
    yield made
    await made.aclose()


async def wait_until_gone(buffer: StreamBuffer, message_id: str, timeout: float) -> float:
    """Seconds until `read` no longer knows the answer; fails after `timeout`."""
    started = time.monotonic()
    while await buffer.read(message_id) is not None:
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{message_id} still readable after {timeout}s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


# -- StreamBuffer ----------------------------------------------------------------------------


async def test_open_append_read_keeps_chunks_in_order(world: StreamWorld) -> None:
    buffer = world.buffer()
    mid, sid = unique("msg"), unique("ses")
    await buffer.open(mid, sid, {"sender_id": "1", "reply_to": "msg-q"})
    opened = await buffer.read(mid)
    assert opened is not None
    assert (opened.message_id, opened.session_id, opened.status) == (mid, sid, "streaming")
    assert opened.meta == {"sender_id": "1", "reply_to": "msg-q"}
    assert (opened.chunks, opened.first_index) == ([], 0)
    texts = [f"c{i} " for i in range(25)] + ["", "ünï ✓", " spaced  "]
    for text in texts:
        await buffer.append(mid, text)
    state = await buffer.read(mid)
    assert state is not None
    assert state.chunks == texts
    assert state.first_index == 0
    assert state.status == "streaming"


async def test_read_from_an_index(world: StreamWorld) -> None:
    buffer = world.buffer()
    mid, sid = unique("msg"), unique("ses")
    await buffer.open(mid, sid, {})
    texts = [f"part-{i}" for i in range(10)]
    for text in texts:
        await buffer.append(mid, text)
    for start in (0, 1, 5, 9):
        state = await buffer.read(mid, start)
        assert state is not None
        assert (state.first_index, state.chunks) == (start, texts[start:]), start
    # At or past the end: nothing yet, but the answer is known and says where it stands.
    for start in (10, 11, 500):
        state = await buffer.read(mid, start)
        assert state is not None
        assert (state.first_index, state.chunks, state.status) == (start, [], "streaming")
    # Reading does not consume: a second reader sees the same chunks.
    again = await buffer.read(mid, 3)
    assert again is not None and again.chunks == texts[3:]


async def test_finish_moves_the_status_and_keeps_the_chunks(world: StreamWorld) -> None:
    buffer = world.buffer()
    sid = unique("ses")
    for status in ("completed", "cancelled", "error"):
        mid = unique("msg")
        await buffer.open(mid, sid, {"sender_id": "1"})
        await buffer.append(mid, "a")
        await buffer.append(mid, "b")
        before = await buffer.read(mid)
        assert before is not None and before.status == "streaming"
        await buffer.finish(mid, status)
        after = await buffer.read(mid)
        assert after is not None
        assert (after.status, after.chunks, after.session_id) == (status, ["a", "b"], sid)
        assert after.meta == {"sender_id": "1"}
        tail = await buffer.read(mid, 1)
        assert tail is not None and (tail.chunks, tail.status) == (["b"], status)


async def test_active_lists_only_streaming_answers_of_that_session(world: StreamWorld) -> None:
    buffer = world.buffer()
    s1, s2 = unique("ses"), unique("ses")
    a, b, c, other = unique("msg"), unique("msg"), unique("msg"), unique("msg")
    assert await buffer.active(s1) == []
    for mid in (a, b, c):
        await buffer.open(mid, s1, {})
    await buffer.open(other, s2, {})
    assert sorted(await buffer.active(s1)) == sorted([a, b, c])
    assert await buffer.active(s2) == [other]
    await buffer.finish(b, "completed")
    assert sorted(await buffer.active(s1)) == sorted([a, c])
    await buffer.finish(a, "cancelled")
    await buffer.finish(c, "error")
    assert await buffer.active(s1) == []
    assert await buffer.active(s2) == [other]  # untouched by the other session's ends
    assert await buffer.active(unique("ses")) == []


async def test_unknown_answers_are_none(world: StreamWorld) -> None:
    buffer = world.buffer()
    assert await buffer.read(unique("msg")) is None
    assert await buffer.read(unique("msg"), 5) is None
    # Appending to an answer that was never opened does not make it exist.
    ghost = unique("msg")
    await buffer.append(ghost, "orphan")
    assert await buffer.read(ghost) is None


async def test_finishing_an_unknown_answer_does_not_make_it_exist(world: StreamWorld) -> None:
    """`finish` on an id the buffer does not know (never opened, expired, or lost with a
    Redis restart) must leave it unknown: `read` → None, so the resume endpoint falls
    back to the stored message, and nothing is left behind without a TTL."""
    buffer = world.buffer()
    ghost = unique("msg")
    await buffer.finish(ghost, "completed")
    assert await buffer.read(ghost) is None
    if world.kind == "redis":
        client = world.client()
        leftovers = await client.keys(f"chat:stream:{ghost}*")
        assert leftovers == [], leftovers


async def test_instances_see_the_same_answer(world: StreamWorld) -> None:
    one, two, three = world.buffer(), world.buffer(), world.buffer()
    mid, sid = unique("msg"), unique("ses")
    await one.open(mid, sid, {"sender_id": "1", "reply_to": "q"})
    await two.append(mid, "x")
    await one.append(mid, "y")
    await three.append(mid, "z")
    for reader in (one, two, three):
        state = await reader.read(mid)
        assert state is not None
        assert (state.session_id, state.status, state.chunks) == (sid, "streaming", ["x", "y", "z"])
        assert state.meta == {"sender_id": "1", "reply_to": "q"}
        assert await reader.active(sid) == [mid]
    await two.finish(mid, "cancelled")
    for reader in (one, two, three):
        state = await reader.read(mid, 2)
        assert state is not None and (state.status, state.chunks) == ("cancelled", ["z"])
        assert await reader.active(sid) == []


async def test_answers_expire_after_the_ttl(world: StreamWorld) -> None:
    buffer = world.buffer(SHORT_TTL)
    mid, sid = unique("msg"), unique("ses")
    await buffer.open(mid, sid, {"sender_id": "1"})
    await buffer.append(mid, "soon gone")
    state = await buffer.read(mid)
    assert state is not None and state.chunks == ["soon gone"]
    took = await wait_until_gone(buffer, mid, SHORT_TTL + 2.0)
    assert took >= SHORT_TTL * 0.5, f"expired after {took:.2f}s, the TTL is {SHORT_TTL}s"
    assert await buffer.read(mid, 0) is None


async def test_a_long_ttl_keeps_the_answer(world: StreamWorld) -> None:
    short, long = world.buffer(SHORT_TTL), world.buffer(TTL)
    gone, kept, sid = unique("msg"), unique("msg"), unique("ses")
    await short.open(gone, sid, {})
    await long.open(kept, sid, {})
    await long.append(kept, "still here")
    await wait_until_gone(short, gone, SHORT_TTL + 2.0)
    state = await long.read(kept)
    assert state is not None and state.chunks == ["still here"]


async def test_active_never_lists_an_expired_answer(world: StreamWorld) -> None:
    """`active` is "the session's answers still streaming": an answer whose buffer has
    expired (e.g. its instance died mid-answer) is no longer one, even when another
    answer of the same session was opened later."""
    buffer = world.buffer(SHORT_TTL)
    sid = unique("ses")
    first, second = unique("msg"), unique("msg")
    await buffer.open(first, sid, {})
    await asyncio.sleep(0.6)
    await buffer.open(second, sid, {})
    await wait_until_gone(buffer, first, SHORT_TTL + 2.0)
    listed = await buffer.active(sid)
    readable = [m for m in listed if await buffer.read(m) is not None]
    assert listed == readable, (
        f"active lists expired answers: {sorted(set(listed) - set(readable))}"
    )
    await wait_until_gone(buffer, second, SHORT_TTL + 2.0)
    assert await buffer.active(sid) == []


# -- Locks -----------------------------------------------------------------------------------


async def test_acquire_is_exclusive(world: StreamWorld) -> None:
    a, b = world.locks(), world.locks()
    name = unique("agent")
    assert await a.acquire(name, 5) is True
    assert await b.acquire(name, 5) is False
    assert await a.acquire(name, 5) is False  # not re-entrant: one answer worker at a time
    assert await b.acquire(unique("agent"), 5) is True  # other names are independent


async def test_concurrent_acquires_let_exactly_one_in(world: StreamWorld) -> None:
    holders = [world.locks() for _ in range(8)]
    name = unique("agent")
    results = await asyncio.gather(*(h.acquire(name, 5) for h in holders))
    assert results.count(True) == 1, results


async def test_release_frees_the_lease(world: StreamWorld) -> None:
    a, b = world.locks(), world.locks()
    name = unique("agent")
    assert await a.acquire(name, 5)
    await a.release(name)
    assert await b.acquire(name, 5) is True
    assert await a.acquire(name, 5) is False
    await b.release(name)
    await b.release(name)  # releasing twice is harmless
    assert await a.acquire(name, 5) is True


async def test_renew_extends_the_lease(world: StreamWorld) -> None:
    a, b = world.locks(), world.locks()
    name = unique("agent")
    assert await a.acquire(name, 0.5)
    await asyncio.sleep(0.3)
    assert await a.renew(name, 1.5) is True
    await asyncio.sleep(0.5)  # past the first TTL, inside the renewed one
    assert await b.acquire(name, 5) is False
    deadline = time.monotonic() + 3.0
    while not await b.acquire(name, 5):  # ...until the renewed TTL runs out
        assert time.monotonic() < deadline, "the renewed lease never lapsed"
        await asyncio.sleep(0.05)


async def test_renew_of_a_lease_never_held_fails(world: StreamWorld) -> None:
    a = world.locks()
    name = unique("agent")
    assert await a.renew(name, 5) is False
    assert await world.locks().acquire(name, 5) is True  # renew did not take it


async def test_a_lapsed_lease_can_be_taken_by_another_holder(world: StreamWorld) -> None:
    a, b = world.locks(), world.locks()
    name = unique("agent")
    assert await a.acquire(name, 0.2)
    assert await b.acquire(name, 5) is False
    await asyncio.sleep(0.35)
    assert await b.acquire(name, 5) is True
    assert await a.acquire(name, 5) is False


async def test_redis_release_by_a_non_holder_does_nothing(redis_world: StreamWorld) -> None:
    a, b = redis_world.locks(), redis_world.locks()
    name = unique("agent")
    assert await a.acquire(name, 5)
    await b.release(name)
    assert await b.acquire(name, 5) is False, "a non-holder's release freed the lease"
    assert await a.renew(name, 5) is True


async def test_redis_a_lapsed_holder_can_neither_renew_nor_release_the_new_lease(
    redis_world: StreamWorld,
) -> None:
    a, b, c = redis_world.locks(), redis_world.locks(), redis_world.locks()
    name = unique("agent")
    assert await a.acquire(name, 0.2)
    await asyncio.sleep(0.35)
    assert await b.acquire(name, 5)
    assert await a.renew(name, 5) is False  # the old holder learns it lost the lease
    await a.release(name)  # and its late release leaves the new holder's lease alone
    assert await c.acquire(name, 5) is False
    await b.release(name)
    assert await c.acquire(name, 5) is True


async def test_redis_lease_keys_expire(redis_world: StreamWorld) -> None:
    a = redis_world.locks()
    name = unique("agent")
    assert await a.acquire(name, 2)
    ttl_ms = await redis_world.client().pttl(f"lock:{name}")
    assert 0 < ttl_ms <= 2000, ttl_ms


async def test_redis_buffer_keys_all_carry_the_ttl(redis_world: StreamWorld) -> None:
    buffer = redis_world.buffer(TTL)
    client = redis_world.client()
    mid, sid = unique("msg"), unique("ses")
    await buffer.open(mid, sid, {"sender_id": "1"})
    await buffer.append(mid, "a")
    await buffer.finish(mid, "completed")
    for key in (f"chat:stream:{mid}", f"chat:stream:{mid}:chunks"):
        ttl = await client.ttl(key)
        assert 0 < ttl <= TTL, (key, ttl)
    ttl = await client.ttl(f"chat:streams:active:{sid}")
    assert ttl == -2 or 0 < ttl <= TTL, ttl  # gone once empty, else expiring
