from __future__ import annotations

import logging

import pytest

from chatservice.bus.memory import MemoryBus


async def test_subscribers_get_what_is_published_on_their_channels() -> None:
    bus = MemoryBus()
    seen: list[tuple[str, bytes]] = []
    await bus.subscribe(["a", "b"], lambda ch, data: seen.append((ch, data)))
    await bus.publish("a", b"1")
    await bus.publish("c", b"ignored")
    await bus.publish("b", b"2")
    assert seen == [("a", b"1"), ("b", b"2")]


async def test_unsubscribed_handlers_stop_receiving() -> None:
    bus = MemoryBus()
    seen: list[bytes] = []

    def handler(_: str, data: bytes) -> None:
        seen.append(data)

    await bus.subscribe(["a"], handler)
    await bus.publish("a", b"1")
    await bus.unsubscribe(["a"], handler)
    await bus.publish("a", b"2")
    assert seen == [b"1"]


async def test_a_failing_handler_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    bus = MemoryBus()
    seen: list[bytes] = []

    def broken(_: str, __: bytes) -> None:
        raise RuntimeError("boom")

    await bus.subscribe(["a"], broken)
    await bus.subscribe(["a"], lambda _, data: seen.append(data))
    with caplog.at_level(logging.ERROR):
        await bus.publish("a", b"1")
    assert seen == [b"1"]
    assert "bus handler failed" in caplog.text
