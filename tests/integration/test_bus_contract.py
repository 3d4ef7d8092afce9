"""The `Bus` contract (`bus/base.py`), run unchanged against MemoryBus and RedisBus.

`world.instance()` is "another instance's bus": the same MemoryBus in-process (one
process is one instance), a second RedisBus with its own client on the same Redis.
Absence of a delivery is always checked behind a barrier: a later marker published on
another channel through the same path has arrived, so anything earlier would have too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.exceptions import RedisError

from chatservice import events
from chatservice.bus.base import Bus
from chatservice.envelope import BadEnvelope, Envelope
from chatservice.publisher import Publisher
from tests.conftest import start_redis
from tests.integration.bus_fixtures import (
    MEMBERS,
    BusWorld,
    Inbox,
    close_bus,
    eventually,
    unique,
)


@pytest.fixture(params=MEMBERS)
async def world(request: pytest.FixtureRequest) -> AsyncIterator[BusWorld]:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    made = BusWorld(request.param, url)
    yield made
    await made.aclose()


@pytest.fixture
async def redis_world(redis_url: str) -> AsyncIterator[BusWorld]:
    made = BusWorld("redis", redis_url)
    yield made
    await made.aclose()


async def barrier(publisher: Bus, subscriber: Bus) -> None:
    """Everything `publisher` published before this has reached `subscriber`'s handlers."""
    channel = unique("barrier")
    marker = Inbox("barrier")
    await subscriber.subscribe([channel], marker)
    await publisher.publish(channel, b"barrier")
    await marker.wait_for(b"barrier")
    await subscriber.unsubscribe([channel], marker)


# -- delivery ------------------------------------------------------------------------------


async def test_publish_reaches_the_subscribers_of_that_channel_only(world: BusWorld) -> None:
    bus, other = await world.instance(), await world.instance()
    a, b = unique("a"), unique("b")
    on_a, on_b = Inbox("on_a"), Inbox("on_b")
    await bus.subscribe([a], on_a)
    await bus.subscribe([b], on_b)

    await other.publish(a, b"for a")
    await other.publish(unique("nobody"), b"for nobody")
    await on_a.wait_for(b"for a")
    await barrier(other, bus)

    assert on_a.got == [(a, b"for a")]
    assert on_b.got == []


async def test_one_subscribe_covers_several_channels(world: BusWorld) -> None:
    bus, other = await world.instance(), await world.instance()
    channels = [unique("c1"), unique("c2"), unique("c3")]
    inbox = Inbox()
    await bus.subscribe(channels, inbox)
    for i, channel in enumerate(channels):
        await other.publish(channel, f"m{i}".encode())
    await inbox.wait_count(3)
    await barrier(other, bus)
    assert sorted(inbox.got) == sorted(
        (channel, f"m{i}".encode()) for i, channel in enumerate(channels)
    )


async def test_order_per_channel_is_publish_order(world: BusWorld) -> None:
    bus, other = await world.instance(), await world.instance()
    channel = unique("order")
    inbox = Inbox()
    await bus.subscribe([channel], inbox)
    sent = [str(i).encode() for i in range(500)]
    for data in sent:
        await other.publish(channel, data)
    await inbox.wait_count(500, timeout=10)
    await barrier(other, bus)
    assert inbox.on(channel) == sent


async def test_publishes_made_together_arrive_in_the_order_they_were_made(
    world: BusWorld,
) -> None:
    """Publishes started in one loop turn (a group commit releases many at once) each
    return once sent, and arrive in the order they were started, across channels."""
    bus, other = await world.instance(), await world.instance()
    channels = [unique("together1"), unique("together2")]
    inbox = Inbox()
    await bus.subscribe(channels, inbox)
    sent = [(channels[i % 2], str(i).encode()) for i in range(600)]
    await asyncio.gather(*(other.publish(channel, data) for channel, data in sent))
    await inbox.wait_count(600, timeout=10)
    await barrier(other, bus)
    assert inbox.got == sent


async def test_unsubscribe_stops_delivery(world: BusWorld) -> None:
    bus, other = await world.instance(), await world.instance()
    channel = unique("unsub")
    leaving, staying = Inbox("leaving"), Inbox("staying")
    await bus.subscribe([channel], leaving)
    await bus.subscribe([channel], staying)
    await other.publish(channel, b"1")
    await leaving.wait_for(b"1")

    await bus.unsubscribe([channel], leaving)
    await other.publish(channel, b"2")
    await staying.wait_for(b"2")
    await barrier(other, bus)
    assert leaving.data == [b"1"]
    assert staying.data == [b"1", b"2"]

    # The last handler leaving ends delivery on the channel altogether.
    await bus.unsubscribe([channel], staying)
    await other.publish(channel, b"3")
    await barrier(other, bus)
    assert staying.data == [b"1", b"2"]
    assert leaving.data == [b"1"]


async def test_unsubscribe_of_one_channel_keeps_the_others(world: BusWorld) -> None:
    bus, other = await world.instance(), await world.instance()
    a, b = unique("a"), unique("b")
    inbox = Inbox()
    await bus.subscribe([a, b], inbox)
    await bus.unsubscribe([a], inbox)
    await other.publish(a, b"on a")
    await other.publish(b, b"on b")
    await inbox.wait_for(b"on b")
    await barrier(other, bus)
    assert inbox.got == [(b, b"on b")]


async def test_several_handlers_on_one_channel_each_get_every_message(world: BusWorld) -> None:
    bus, other = await world.instance(), await world.instance()
    channel = unique("many")
    inboxes = [Inbox(f"h{i}") for i in range(3)]
    for inbox in inboxes:
        await bus.subscribe([channel], inbox)
    await other.publish(channel, b"x")
    await other.publish(channel, b"y")
    for inbox in inboxes:
        await inbox.wait_count(2)
    await barrier(other, bus)
    for inbox in inboxes:
        assert inbox.data == [b"x", b"y"], inbox.name


async def test_a_failing_handler_does_not_stop_the_others(
    world: BusWorld, caplog: pytest.LogCaptureFixture
) -> None:
    bus, other = await world.instance(), await world.instance()
    channel = unique("broken")
    before, after = Inbox("before"), Inbox("after")

    def broken(_: str, __: bytes) -> None:
        raise RuntimeError("boom")

    await bus.subscribe([channel], before)
    await bus.subscribe([channel], broken)
    await bus.subscribe([channel], after)
    with caplog.at_level(logging.ERROR):
        await other.publish(channel, b"1")
        await after.wait_for(b"1")
        # ... and the bus keeps delivering afterwards.
        await other.publish(channel, b"2")
        await after.wait_for(b"2")
    assert before.data == [b"1", b"2"]
    assert after.data == [b"1", b"2"]
    assert "bus handler failed" in caplog.text


async def test_subscribe_returns_only_once_in_effect(world: BusWorld) -> None:
    """A message another instance publishes right after `subscribe` returns is seen."""
    bus, other = await world.instance(), await world.instance()
    inboxes: list[tuple[str, Inbox]] = []
    for i in range(20):
        channel = unique(f"eff{i}")
        inbox = Inbox(channel)
        await bus.subscribe([channel], inbox)
        await other.publish(channel, b"right after")
        inboxes.append((channel, inbox))
    await barrier(other, bus)
    missed = [channel for channel, inbox in inboxes if inbox.data != [b"right after"]]
    assert missed == []


async def test_a_second_subscriber_also_returns_only_once_in_effect(world: BusWorld) -> None:
    """Two subscribers of one channel racing: the second must not return before the
    subscription the first one started is in effect."""
    bus, other = await world.instance(), await world.instance()
    channel = unique("race")
    first, second = Inbox("first"), Inbox("second")
    starting = asyncio.create_task(bus.subscribe([channel], first))
    await asyncio.sleep(0)  # the first subscribe is under way
    await bus.subscribe([channel], second)
    await other.publish(channel, b"after the second returned")
    await starting
    await barrier(other, bus)
    assert second.data == [b"after the second returned"]


async def test_resubscribing_right_after_the_last_unsubscribe_works(world: BusWorld) -> None:
    """The hub's churn: a room's last connection leaves, a new one arrives at once."""
    bus, other = await world.instance(), await world.instance()
    channel = unique("churn")
    for round_ in range(5):
        old, new = Inbox("old"), Inbox("new")
        await bus.subscribe([channel], old)
        await bus.unsubscribe([channel], old)
        await bus.subscribe([channel], new)
        data = f"round {round_}".encode()
        await other.publish(channel, data)
        await barrier(other, bus)
        assert new.data == [data], round_
        assert old.data == []
        await bus.unsubscribe([channel], new)


async def test_ping_answers(world: BusWorld) -> None:
    bus = await world.instance()
    await bus.ping()


@pytest.mark.parametrize("yields", [0, 2, 10])
async def test_close_right_after_start_returns_promptly(world: BusWorld, yields: int) -> None:
    """A server told to stop while still starting must not hang in `bus.close()`."""
    bus = await world.instance()
    for _ in range(yields):
        await asyncio.sleep(0)
    started = time.monotonic()
    assert await close_bus(bus), f"close() still running after {time.monotonic() - started:.1f}s"


# -- Redis: across instances and through failures -----------------------------------------


async def test_redis_publish_reaches_every_instance_exactly_once(redis_world: BusWorld) -> None:
    assert redis_world.redis_url is not None
    one = await redis_world.redis_bus(redis_world.redis_url)
    two = await redis_world.redis_bus(redis_world.redis_url)
    channel = unique("cross")
    on_one, on_two = Inbox("one"), Inbox("two")
    await one.subscribe([channel], on_one)
    await two.subscribe([channel], on_two)

    await two.publish(channel, b"from two")
    await one.publish(channel, b"from one")
    await on_one.wait_count(2)
    await on_two.wait_count(2)
    await barrier(one, two)
    await barrier(two, one)
    # The publisher's own handlers get it through Redis, not a second time locally.
    assert on_one.data == [b"from two", b"from one"]
    assert on_two.data == [b"from two", b"from one"]


async def test_redis_second_subscriber_waits_for_a_slow_first_subscription(
    redis_world: BusWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race above made deterministic: the link to Redis is slow (the first
    subscriber's SUBSCRIBE takes 200 ms to leave), and a second subscriber of the same
    channel must still return only once the subscription is in effect."""
    assert redis_world.redis_url is not None
    bus = await redis_world.redis_bus(redis_world.redis_url)
    other = await redis_world.redis_bus(redis_world.redis_url)
    pubsub = bus._pubsub
    assert pubsub is not None
    send_subscribe = pubsub.subscribe

    async def slow_subscribe(*args: object, **kwargs: object) -> object:
        await asyncio.sleep(0.2)
        return await send_subscribe(*args, **kwargs)

    monkeypatch.setattr(pubsub, "subscribe", slow_subscribe)
    channel = unique("slow")
    first, second = Inbox("first"), Inbox("second")
    starting = asyncio.create_task(bus.subscribe([channel], first))
    await asyncio.sleep(0.01)  # the first subscribe is under way
    await bus.subscribe([channel], second)
    await other.publish(channel, b"after the second returned")
    await starting
    await barrier(other, bus)
    assert second.data == [b"after the second returned"]


async def test_redis_bus_survives_its_redis_being_killed_and_started_again(
    redis_world: BusWorld, tmp_path: Path
) -> None:
    redis = start_redis(tmp_path / "redis")
    try:
        bus = await redis_world.redis_bus(redis.url)
        other = await redis_world.redis_bus(redis.url)
        reconnects: list[str] = []

        async def on_reconnect() -> None:
            reconnects.append("bus")

        bus.on_reconnect(on_reconnect)
        channel = unique("survive")
        inbox = Inbox()
        await bus.subscribe([channel], inbox)
        await other.publish(channel, b"before")
        await inbox.wait_for(b"before")

        redis.kill()
        # Down: ping reports it; publish does not raise and reaches our own handlers.
        with pytest.raises((RedisError, OSError)):
            await asyncio.wait_for(bus.ping(), 10)
        await asyncio.wait_for(bus.publish(channel, b"while down"), 10)
        assert inbox.data == [b"before", b"while down"]
        # Many at once too, each once, in order.
        together = [f"down {i}".encode() for i in range(20)]
        await asyncio.wait_for(
            asyncio.gather(*(bus.publish(channel, data) for data in together)), 10
        )
        assert inbox.data == [b"before", b"while down", *together]

        redis.start()
        await eventually(lambda: bool(reconnects), 15, "the on_reconnect listener")
        # The subscription is back by itself: another instance's publish arrives.
        publisher = redis_world.client(redis.url)
        await publisher.ping()
        await publisher.publish(channel, b"after")
        await inbox.wait_for(b"after")
        await bus.ping()
        assert inbox.data == [b"before", b"while down", *together, b"after"]
        assert reconnects == ["bus"]
    finally:
        redis.stop()


async def test_redis_reconnect_is_noticed_even_when_redis_is_back_quickly(
    redis_world: BusWorld, tmp_path: Path
) -> None:
    """Messages published while the link was down are lost to pub/sub; only the
    `on_reconnect` listener lets the hub fetch them. It must run whenever the link was
    lost, however quickly Redis returns."""
    redis = start_redis(tmp_path / "redis")
    try:
        bus = await redis_world.redis_bus(redis.url)
        reconnects: list[str] = []

        async def on_reconnect() -> None:
            reconnects.append("bus")

        bus.on_reconnect(on_reconnect)
        channel = unique("quick")
        inbox = Inbox()
        await bus.subscribe([channel], inbox)
        redis.kill()
        redis.start()  # back within a few milliseconds
        await eventually(lambda: bool(reconnects), 15, "the on_reconnect listener")
        publisher = redis_world.client(redis.url)
        await publisher.publish(channel, b"after")
        await inbox.wait_for(b"after")
    finally:
        redis.stop()


async def test_redis_instances_talk_again_after_a_restart(
    redis_world: BusWorld, tmp_path: Path
) -> None:
    redis = start_redis(tmp_path / "redis")
    try:
        one = await redis_world.redis_bus(redis.url)
        two = await redis_world.redis_bus(redis.url)
        back: list[str] = []

        async def one_back() -> None:
            back.append("one")

        async def two_back() -> None:
            back.append("two")

        one.on_reconnect(one_back)
        two.on_reconnect(two_back)
        channel = unique("again")
        inbox = Inbox()
        await one.subscribe([channel], inbox)

        redis.kill()
        await asyncio.sleep(0.3)  # both readers notice the loss
        redis.start()
        await eventually(lambda: sorted(back) == ["one", "two"], 15, "both reconnects")
        await two.publish(channel, b"across, after the restart")
        await inbox.wait_for(b"across, after the restart")
    finally:
        redis.stop()


# -- envelopes ------------------------------------------------------------------------------


async def test_envelopes_travel_to_their_audiences_channel_unchanged(world: BusWorld) -> None:
    """What the publisher sends is what every hub decodes: the header fields, and the
    payload bytes untouched (the native codec forwards them as they are)."""
    sending, receiving = await world.instance(), await world.instance()
    session, user = unique("s"), unique("u")
    inbox = Inbox("envelopes")
    await receiving.subscribe(
        [
            events.session_channel(session),
            events.typing_channel(session),
            events.user_channel(user),
        ],
        inbox,
    )
    publisher = Publisher(sending)
    chunk = await publisher.publish(events.stream_chunk_event(session, "msg_1", "hel", 3))
    typing = await publisher.publish(events.typing_event(session, "alice", True))
    notice = await publisher.publish(events.unread_event(session, 7, 0), to_user=user)
    await inbox.wait_count(3)
    got = {channel: Envelope.decode(data) for channel, data in inbox.got}
    arrived = got[events.session_channel(session)]
    assert (arrived.kind, arrived.session_id, arrived.stream_id, arrived.chunk) == (
        "stream_chunk",
        session,
        "msg_1",
        3,
    )
    assert arrived.payload == chunk.payload
    assert arrived.event == events.stream_chunk_event(session, "msg_1", "hel", 3)
    assert got[events.typing_channel(session)].actor == "alice"
    assert got[events.typing_channel(session)].payload == typing.payload
    mine = got[events.user_channel(user)]
    assert (mine.user_id, mine.kind, mine.payload) == (user, "unread", notice.payload)


def test_an_envelope_survives_encoding_and_bad_bytes_are_refused() -> None:
    message = {"type": "message", "session_id": "s1", "seq": 42, "content": "line\nbreak"}
    envelope = Envelope.of(message, trace="t-1")
    decoded = Envelope.decode(envelope.encode())
    assert (decoded.kind, decoded.session_id, decoded.seq, decoded.trace) == (
        "message",
        "s1",
        42,
        "t-1",
    )
    assert decoded.event == message
    for bad in (b"", b"no header", b"[1]\n{}", b'{"x":1}\n{}', b"\xff\n{}"):
        with pytest.raises(BadEnvelope):
            Envelope.decode(bad)
