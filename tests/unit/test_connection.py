"""A connection's send queue and a subscription's hand-over: order, replay, the
slow-consumer bound."""

from __future__ import annotations

import asyncio

from chatservice.envelope import Envelope
from chatservice.realtime.codec import NATIVE, CloseReason
from chatservice.realtime.connection import Connection, Subscription
from chatservice.realtime.sink import AwaitingSink

CLOSE_SLOW_CONSUMER = NATIVE.close_code(CloseReason.SLOW_CONSUMER)


def event(seq: int | None, text: str) -> Envelope:
    """An event whose native frame is `text` (a JSON string, for readable assertions)."""
    return Envelope(
        kind="message" if seq else "typing", payload=b'"' + text.encode() + b'"', seq=seq
    )


class Peer:
    """Stands for the socket: records frames, or never finishes a send when `stuck`."""

    def __init__(self, stuck: bool = False) -> None:
        self.frames: list[str] = []
        self.closed: tuple[int, str] | None = None
        self.stuck = stuck

    async def send(self, frame: bytes) -> None:
        if self.stuck:
            await asyncio.Event().wait()
        self.frames.append(frame.decode().strip('"'))

    async def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


def connection(peer: Peer, queue_size: int = 16) -> Subscription:
    conn = Connection("c1", "alice", AwaitingSink(peer.send, peer.close), queue_size)
    return Subscription(conn, "s1")


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_frames_are_held_until_live_then_sent_in_order() -> None:
    peer = Peer()
    conn = connection(peer)
    conn.offer(event(1, "m1"))
    conn.offer(event(None, "typing"))
    await settle()
    assert peer.frames == []
    await conn.go_live()
    conn.offer(event(2, "m2"))
    await settle()
    assert peer.frames == ["m1", "typing", "m2"]
    await conn.conn.stop()


async def test_replayed_messages_are_not_sent_twice() -> None:
    peer = Peer()
    conn = connection(peer)
    conn.last_seq = 0
    conn.offer(event(2, "m2-live"))  # published while the replay was reading the database
    conn.offer(event(3, "m3-live"))
    for seq in (1, 2):
        await conn.replay(event(seq, f"m{seq}-db"))
    await conn.go_live()
    conn.offer(event(3, "m3-again"))
    await settle()
    assert peer.frames == ["m1-db", "m2-db", "m3-live"]
    await conn.conn.stop()


async def test_a_client_that_stops_reading_is_closed_as_slow() -> None:
    peer = Peer(stuck=True)
    conn = connection(peer, queue_size=4)
    await conn.go_live()
    for seq in range(1, 10):
        conn.offer(event(seq, f"m{seq}"))
    await settle()
    assert conn.conn.closed
    assert peer.closed is not None and peer.closed[0] == CLOSE_SLOW_CONSUMER
    await conn.conn.stop()


async def test_holding_back_is_bounded_too() -> None:
    peer = Peer()
    conn = connection(peer, queue_size=3)
    for seq in range(1, 6):
        conn.offer(event(seq, f"m{seq}"))
    await settle()
    assert peer.closed is not None and peer.closed[0] == CLOSE_SLOW_CONSUMER
    await conn.conn.stop()
