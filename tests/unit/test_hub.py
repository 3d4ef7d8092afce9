"""The hub's sequencer with an in-memory history: order, gaps, one subscription per room."""

from __future__ import annotations

import asyncio

import orjson

from chatservice import events
from chatservice.bus.memory import MemoryBus
from chatservice.bus.presence import MemoryPresence
from chatservice.domain import new_id
from chatservice.realtime.connection import Connection
from chatservice.realtime.hub import Hub


class History:
    def __init__(self) -> None:
        self.frames: dict[int, str] = {}

    async def last_seq(self, session_id: str) -> int:
        return max(self.frames, default=0)

    async def frames_after(self, session_id: str, after: int, limit: int) -> list[tuple[int, str]]:
        seqs = sorted(s for s in self.frames if s > after)[:limit]
        return [(s, self.frames[s]) for s in seqs]


def frame(seq: int) -> bytes:
    return orjson.dumps({"type": "message", "seq": seq, "content": f"m{seq}"})


class Recorder:
    def __init__(self) -> None:
        self.frames: list[dict[str, object]] = []

    async def send(self, text: str) -> None:
        self.frames.append(orjson.loads(text))

    async def close(self, code: int, reason: str) -> None:
        return None

    def seqs(self) -> list[object]:
        return [f["seq"] for f in self.frames if f.get("type") == "message"]


async def join(hub: Hub, user: str) -> tuple[Connection, Recorder]:
    recorder = Recorder()
    conn = Connection(new_id("conn"), "s1", user, recorder.send, recorder.close, 64)
    conn.start()
    await hub.attach(conn)
    await conn.go_live()
    return conn, recorder


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def test_out_of_order_publishes_are_released_in_seq_order() -> None:
    bus, history = MemoryBus(), History()
    hub = Hub(bus, history, MemoryPresence(300), gap_timeout=5)
    _, alice = await join(hub, "alice")
    channel = events.session_channel("s1")
    for seq in (2, 3, 1, 4):
        history.frames[seq] = frame(seq).decode()
        await bus.publish(channel, frame(seq))
    await settle()
    assert alice.seqs() == [1, 2, 3, 4]


async def test_a_publish_that_never_arrives_is_filled_from_history() -> None:
    bus, history = MemoryBus(), History()
    hub = Hub(bus, history, MemoryPresence(300), gap_timeout=0.01)
    _, alice = await join(hub, "alice")
    history.frames[1] = frame(1).decode()  # committed, but its publish was lost
    history.frames[2] = frame(2).decode()
    await bus.publish(events.session_channel("s1"), frame(2))
    await asyncio.sleep(0.1)
    assert alice.seqs() == [1, 2]


async def test_a_seq_missing_from_history_is_skipped_not_waited_for() -> None:
    bus, history = MemoryBus(), History()
    hub = Hub(bus, history, MemoryPresence(300), gap_timeout=0.01)
    _, alice = await join(hub, "alice")
    history.frames[2] = frame(2).decode()  # seq 1 was deleted
    await bus.publish(events.session_channel("s1"), frame(2))
    await asyncio.sleep(0.1)
    assert alice.seqs() == [2]


async def test_one_subscription_per_session_whatever_the_connections() -> None:
    bus, history = MemoryBus(), History()
    hub = Hub(bus, history, MemoryPresence(300))
    conns = [await join(hub, f"user{i}") for i in range(5)]
    assert all(len(h) == 1 for h in bus._handlers.values())
    for conn, _ in conns:
        await hub.detach(conn)
    assert bus._handlers == {}


async def test_typing_skips_the_typer_and_presence_follows_first_and_last_connection() -> None:
    bus, history = MemoryBus(), History()
    hub = Hub(bus, history, MemoryPresence(300))
    alice_conn, alice = await join(hub, "alice")
    _, bob = await join(hub, "bob")
    second_bob, _ = await join(hub, "bob")
    event = events.typing_event("s1", "alice", True)
    await bus.publish(events.typing_channel("s1"), events.encode(event))
    await hub.detach(second_bob)
    await hub.detach(alice_conn)
    await settle()
    assert [f["type"] for f in alice.frames].count("typing") == 0
    assert next(f for f in bob.frames if f["type"] == "typing")["user_id"] == "alice"
    presence = [(f["event"], f["user_id"]) for f in bob.frames if f["type"] == "system"]
    assert presence == [("user_joined", "bob"), ("user_left", "alice")]
