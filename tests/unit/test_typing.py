from __future__ import annotations

from chatservice.bus.memory import MemoryBus
from chatservice.events import typing_channel
from chatservice.services.typing import TypingService


async def test_repeated_typing_is_throttled_and_stopping_is_always_sent() -> None:
    bus = MemoryBus()
    published: list[bytes] = []
    await bus.subscribe([typing_channel("s1")], lambda _, data: published.append(data))
    typing = TypingService(bus)
    results = [await typing.set_typing("s1", "alice", True) for _ in range(50)]
    assert results.count(True) == 1
    assert await typing.set_typing("s1", "alice", False)
    assert not await typing.set_typing("s1", "alice", False)
    assert len(published) == 2


async def test_a_disconnect_clears_an_indicator_left_on() -> None:
    bus = MemoryBus()
    published: list[bytes] = []
    await bus.subscribe([typing_channel("s1")], lambda _, data: published.append(data))
    typing = TypingService(bus)
    await typing.set_typing("s1", "alice", True)
    await typing.stopped("s1", "alice")
    await typing.stopped("s1", "bob")
    assert len(published) == 2 and b'"is_typing":false' in published[-1]
