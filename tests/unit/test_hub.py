"""The hub's sequencer with an in-memory history: order, gaps, one subscription per room."""

from __future__ import annotations

import asyncio

import orjson

from chatservice import events
from chatservice.bus.memory import MemoryBus
from chatservice.bus.presence import MemoryPresence
from chatservice.domain import new_id
from chatservice.envelope import Envelope
from chatservice.publisher import Publisher
from chatservice.realtime.codec import NATIVE, CloseReason
from chatservice.realtime.connection import Connection
from chatservice.realtime.hub import Hub
from chatservice.realtime.sink import AwaitingSink


class History:
    def __init__(self) -> None:
        self.frames: dict[int, bytes] = {}

    async def last_seq(self, session_id: str) -> int:
        return max(self.frames, default=0)

    async def after(self, session_id: str, after: int, limit: int) -> list[Envelope]:
        seqs = sorted(s for s in self.frames if s > after)[:limit]
        return [Envelope.decode(self.frames[s]) for s in seqs]


def frame(seq: int) -> bytes:
    return Envelope.of(
        {"type": "message", "session_id": "s1", "seq": seq, "content": f"m{seq}"}
    ).encode()


class Recorder:
    def __init__(self) -> None:
        self.frames: list[dict[str, object]] = []
        self.raw: list[str] = []

    async def send(self, frame: bytes) -> None:
        text = frame.decode()
        self.raw.append(text)
        if text.startswith("{"):
            self.frames.append(orjson.loads(text))

    async def close(self, code: int, reason: str) -> None:
        return None

    def seqs(self) -> list[object]:
        return [f["seq"] for f in self.frames if f.get("type") == "message"]


async def join(hub: Hub, user: str) -> tuple[Connection, Recorder]:
    recorder = Recorder()
    conn = Connection(new_id("conn"), user, AwaitingSink(recorder.send, recorder.close), 64)
    await hub.connect(conn)
    sub = await hub.subscribe(conn, "s1")
    await sub.go_live()
    return conn, recorder


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def test_out_of_order_publishes_are_released_in_seq_order() -> None:
    bus, history = MemoryBus(), History()
    hub = Hub(bus, history, MemoryPresence(300), Publisher(bus), gap_timeout=5)
    _, alice = await join(hub, "alice")
    channel = events.session_channel("s1")
    for seq in (2, 3, 1, 4):
        history.frames[seq] = frame(seq)
        await bus.publish(channel, frame(seq))
    await settle()
    assert alice.seqs() == [1, 2, 3, 4]


async def test_a_publish_that_never_arrives_is_filled_from_history() -> None:
    bus, history = MemoryBus(), History()
    hub = Hub(bus, history, MemoryPresence(300), Publisher(bus), gap_timeout=0.01)
    _, alice = await join(hub, "alice")
    history.frames[1] = frame(1)  # committed, but its publish was lost
    history.frames[2] = frame(2)
    await bus.publish(events.session_channel("s1"), frame(2))
    await asyncio.sleep(0.1)
    assert alice.seqs() == [1, 2]


async def test_a_seq_missing_from_history_is_skipped_not_waited_for() -> None:
    bus, history = MemoryBus(), History()
    hub = Hub(bus, history, MemoryPresence(300), Publisher(bus), gap_timeout=0.01)
    _, alice = await join(hub, "alice")
    history.frames[2] = frame(2)  # seq 1 was deleted
    await bus.publish(events.session_channel("s1"), frame(2))
    await asyncio.sleep(0.1)
    assert alice.seqs() == [2]


async def test_one_subscription_per_session_whatever_the_connections() -> None:
    bus, history = MemoryBus(), History()
    hub = Hub(bus, history, MemoryPresence(300), Publisher(bus))
    conns = [await join(hub, f"user{i}") for i in range(5)]
    assert all(len(h) == 1 for h in bus._handlers.values())
    for conn, _ in conns:
        await hub.disconnect(conn)
    assert bus._handlers == {}


async def test_typing_skips_the_typer_and_presence_follows_first_and_last_connection() -> None:
    bus, history = MemoryBus(), History()
    hub = Hub(bus, history, MemoryPresence(300), Publisher(bus))
    alice_conn, alice = await join(hub, "alice")
    _, bob = await join(hub, "bob")
    second_bob, _ = await join(hub, "bob")
    await Publisher(bus).publish(events.typing_event("s1", "alice", True))
    await hub.disconnect(second_bob)
    await hub.disconnect(alice_conn)
    await settle()
    assert [f["type"] for f in alice.frames].count("typing") == 0
    assert next(f for f in bob.frames if f["type"] == "typing")["user_id"] == "alice"
    presence = [(f["event"], f["user_id"]) for f in bob.frames if f["type"] == "system"]
    assert presence == [("user_joined", "bob"), ("user_left", "alice")]


class CountingCodec:
    """A second protocol: upper-cases the content, and counts its encodings."""

    name = "shouting"

    def __init__(self) -> None:
        self.encoded = 0

    def frame(self, envelope: Envelope) -> bytes | None:
        self.encoded += 1
        if envelope.kind != "message":
            return None  # this protocol has no frame for the rest
        return str(envelope.event["content"]).upper().encode()

    def control(self, frame: dict[str, object]) -> bytes:
        return str(frame).encode()

    def close_code(self, reason: CloseReason) -> int:
        return 4000


async def test_each_codec_encodes_an_event_once_whatever_the_connections() -> None:
    bus, history = MemoryBus(), History()
    hub = Hub(bus, history, MemoryPresence(300), Publisher(bus))
    codec = CountingCodec()
    shouting = []
    for i in range(5):
        recorder = Recorder()
        conn = Connection(
            new_id("conn"),
            f"user{i}",
            AwaitingSink(recorder.send, recorder.close),
            64,
            codec=codec,
        )
        await hub.connect(conn)
        await (await hub.subscribe(conn, "s1")).go_live()
        shouting.append(recorder)
    native = [await join(hub, f"native{i}") for i in range(3)]
    await settle()
    codec.encoded = 0  # the joins' presence announcements
    await bus.publish(events.session_channel("s1"), frame(1))
    await Publisher(bus).publish(events.typing_event("s1", "someone", True))
    await settle()
    assert codec.encoded == 2  # the message and the typing event, once each
    assert all(r.raw == ["M1"] for r in shouting)
    assert all(r.seqs() == [1] for _, r in native)


def test_the_native_codec_gives_every_closing_reason_its_own_code() -> None:
    codes = [NATIVE.close_code(reason) for reason in CloseReason]
    assert len(set(codes)) == len(codes)
    assert NATIVE.close_code(CloseReason.SLOW_CONSUMER) == 4008
    assert NATIVE.close_code(CloseReason.UNAUTHORIZED) == 4401
