from __future__ import annotations

import asyncio

from chatservice.bus.memory import MemoryBus
from chatservice.events import typing_channel
from chatservice.publisher import Publisher
from chatservice.services.typing import TypingService


async def test_repeated_typing_is_throttled_and_stopping_is_always_sent() -> None:
    bus = MemoryBus()
    published: list[bytes] = []
    await bus.subscribe([typing_channel("s1")], lambda _, data: published.append(data))
    typing = TypingService(Publisher(bus))
    results = [await typing.set_typing("s1", "alice", True) for _ in range(50)]
    assert results.count(True) == 1
    assert await typing.set_typing("s1", "alice", False)
    assert not await typing.set_typing("s1", "alice", False)
    assert len(published) == 2


async def test_a_disconnect_clears_an_indicator_left_on() -> None:
    bus = MemoryBus()
    published: list[bytes] = []
    await bus.subscribe([typing_channel("s1")], lambda _, data: published.append(data))
    typing = TypingService(Publisher(bus))
    await typing.set_typing("s1", "alice", True)
    await typing.stopped("s1", "alice")
    await typing.stopped("s1", "bob")
    assert len(published) == 2 and b'"is_typing":false' in published[-1]


async def test_an_indicator_nobody_refreshes_expires_with_a_stop() -> None:
    bus = MemoryBus()
    published: list[bytes] = []
    await bus.subscribe([typing_channel("s1")], lambda _, data: published.append(data))
    typing = TypingService(Publisher(bus), ttl=0.1)
    await typing.set_typing("s1", "alice", True)
    await asyncio.sleep(0.05)
    await typing.set_typing("s1", "alice", True)  # a refresh re-arms the timer
    await asyncio.sleep(0.08)
    assert len(published) == 1
    await asyncio.sleep(0.1)
    assert len(published) == 2 and b'"is_typing":false' in published[-1]
    await typing.close()


async def test_a_stop_reaches_the_bus_from_an_instance_that_never_saw_the_start() -> None:
    """Typing on a phone (instance A), stopping on a laptop (instance B)."""
    bus = MemoryBus()
    published: list[bytes] = []
    await bus.subscribe([typing_channel("s1")], lambda _, data: published.append(data))
    phone_side, laptop_side = TypingService(Publisher(bus)), TypingService(Publisher(bus))
    assert await phone_side.set_typing("s1", "alice", True)
    assert await laptop_side.set_typing("s1", "alice", False)
    assert not await laptop_side.set_typing("s1", "alice", False)  # repeating itself
    assert [b'"is_typing":true' in p for p in published] == [True, False]
    await phone_side.close()
    await laptop_side.close()
