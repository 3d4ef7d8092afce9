"""`chat-service loadtest`: drive a running server with chat traffic and measure delivery.

The scenarios are those of the peer benchmark, spoken in this service's own protocol:

- `fanout`: R rooms of K members; one sender per room keeps W messages unacknowledged
  (its own echo is the acknowledgement) for the duration: the delivery ceiling.
- `chat`: R rooms of K members, S senders per room, each at a fixed rate: latency and
  loss under a steady load.
- `idle`: R rooms of K members connect, stay idle, then one message per room: memory per
  connection on the server side, and whether every delivery arrives.

Every member of every room counts every `message` frame it receives: deliveries/s, the
latency from send to receive (the send time travels in the message's metadata; client
and server share the clock only when they share the machine, which is how it is meant to
be run), lost deliveries after the drain, and frames out of `seq` order or duplicated.
Tokens are minted with the server's secret (JWT_SECRET_KEY or DATA_DIR's), as
`chat-service token` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import websockets
from websockets.asyncio.client import ClientConnection

from chatservice.auth import TokenCodec
from chatservice.tally import SeqTally, percentile

SCENARIOS = ("fanout", "chat", "idle")
CONNECT_CONCURRENCY = 50


@dataclass(frozen=True)
class Plan:
    scenario: str
    rooms: int
    members: int
    senders: int = 1
    window: int = 20
    rate: float = 2.0  # messages per second per sender (chat)
    duration: float = 10.0
    drain: float = 10.0
    size: int = 64  # characters of content per message
    idle: float = 2.0  # seconds connected before the idle scenario's messages


@dataclass
class Member:
    user_id: str
    ws: ClientConnection
    tally: SeqTally


@dataclass
class Results:
    plan: Plan
    connected: int = 0
    sent: int = 0
    expected: int = 0
    received: int = 0
    out_of_order: int = 0
    duplicates: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    first_send: float = 0.0
    last_delivery: float = 0.0

    @property
    def lost(self) -> int:
        return max(0, self.expected - self.received)

    @property
    def deliveries_per_second(self) -> float:
        elapsed = self.last_delivery - self.first_send
        return self.received / elapsed if elapsed > 0 else 0.0

    def percentile(self, fraction: float) -> float:
        return percentile(self.latencies_ms, fraction) if self.latencies_ms else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "scenario": self.plan.scenario,
            "rooms": self.plan.rooms,
            "members": self.plan.members,
            "connected": self.connected,
            "sent": self.sent,
            "expected_deliveries": self.expected,
            "delivered": self.received,
            "lost": self.lost,
            "out_of_order": self.out_of_order,
            "duplicates": self.duplicates,
            "deliveries_per_s": round(self.deliveries_per_second),
            "p50_ms": round(self.percentile(0.50), 2),
            "p90_ms": round(self.percentile(0.90), 2),
            "p99_ms": round(self.percentile(0.99), 2),
            "max_ms": round(max(self.latencies_ms, default=0.0), 2),
            "errors": self.errors[:10],
        }


Progress = Callable[[str, float, float], None]  # phase, done, total


class LoadTest:
    def __init__(self, base_url: str, tokens: TokenCodec, plan: Plan, progress: Progress) -> None:
        self.base_url = base_url.rstrip("/")
        self.ws_base = self.base_url.replace("http", "ws", 1)
        self.tokens = tokens
        self.plan = plan
        self.progress = progress
        self.results = Results(plan)
        self.run_id = f"lt{int(time.time() * 1000) % 10**9}"
        self._acks: dict[str, asyncio.Event] = {}

    async def run(self) -> Results:
        plan = self.plan
        rooms = await self._create_rooms()
        members = await self._connect(rooms)
        readers = [
            asyncio.create_task(self._read(member)) for room in members.values() for member in room
        ]
        try:
            if plan.scenario == "idle":
                await self._wait_idle()
            self.results.first_send = time.monotonic()
            if plan.scenario == "fanout":
                await self._fanout(members)
            elif plan.scenario == "chat":
                await self._chat(members)
            else:
                await self._one_each(members)
            await self._drain()
        finally:
            for task in readers:
                task.cancel()
            for room in members.values():
                for member in room:
                    with contextlib.suppress(Exception):
                        await member.ws.close()
        for room in members.values():
            for member in room:
                self.results.out_of_order += member.tally.gaps
                self.results.duplicates += member.tally.duplicates
        return self.results

    # -- set-up ----------------------------------------------------------------------------

    async def _create_rooms(self) -> dict[str, list[str]]:
        plan = self.plan
        rooms: dict[str, list[str]] = {}
        limits = httpx.Limits(max_connections=20)
        async with httpx.AsyncClient(base_url=self.base_url, timeout=30, limits=limits) as http:
            gate = asyncio.Semaphore(20)

            async def create(index: int) -> None:
                users = [f"{self.run_id}-r{index}-u{k}" for k in range(plan.members)]
                async with gate:
                    response = await http.post(
                        "/api/chat/sessions",
                        json={"title": f"loadtest {index}", "participants": users[1:]},
                        headers={"Authorization": f"Bearer {self.tokens.issue(users[0])}"},
                    )
                if response.status_code != 201:
                    raise RuntimeError(
                        f"creating a room failed: {response.status_code} {response.text}"
                    )
                rooms[response.json()["session_id"]] = users
                self.progress("rooms", len(rooms), plan.rooms)

            await asyncio.gather(*(create(i) for i in range(plan.rooms)))
        return rooms

    async def _connect(self, rooms: dict[str, list[str]]) -> dict[str, list[Member]]:
        total = sum(len(users) for users in rooms.values())
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
        members: dict[str, list[Member]] = {sid: [] for sid in rooms}

        async def connect(session_id: str, user_id: str) -> None:
            token = self.tokens.issue(user_id)
            async with gate:
                ws = await websockets.connect(
                    f"{self.ws_base}/ws/{session_id}?token={token}",
                    max_queue=None,
                    compression=None,
                    open_timeout=30,
                )
                first = orjson.loads(await asyncio.wait_for(ws.recv(), 30))
                if first.get("type") != "connected":
                    raise RuntimeError(f"expected `connected`, got {first}")
            members[session_id].append(Member(user_id, ws, SeqTally(int(first["last_seq"]))))
            self.results.connected += 1
            self.progress("connect", self.results.connected, total)

        await asyncio.gather(
            *(connect(sid, user) for sid, users in rooms.items() for user in users)
        )
        return members

    async def _wait_idle(self) -> None:
        deadline = time.monotonic() + self.plan.idle
        while (left := deadline - time.monotonic()) > 0:
            self.progress("idle", self.plan.idle - left, self.plan.idle)
            await asyncio.sleep(min(0.2, left))

    # -- traffic ---------------------------------------------------------------------------

    def _frame(self, sender: Member, number: int) -> tuple[str, str]:
        cid = f"{sender.user_id}-{number}"
        content = ("m" * self.plan.size)[: self.plan.size]
        frame = {
            "type": "message",
            "content": content,
            "client_msg_id": cid,
            "metadata": {"t": time.time()},
        }
        return cid, orjson.dumps(frame).decode()

    async def _send(self, room_size: int, sender: Member, number: int) -> str:
        cid, text = self._frame(sender, number)
        self._acks[cid] = asyncio.Event()
        await sender.ws.send(text)
        self.results.sent += 1
        self.results.expected += room_size
        return cid

    async def _fanout(self, members: dict[str, list[Member]]) -> None:
        plan = self.plan
        stop_at = time.monotonic() + plan.duration

        async def sender(room: list[Member]) -> None:
            window = asyncio.Semaphore(plan.window)
            number = 0
            pending: set[asyncio.Task[None]] = set()
            while time.monotonic() < stop_at:
                await window.acquire()
                cid = await self._send(len(room), room[0], number)
                number += 1

                async def release(cid: str = cid) -> None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._acks[cid].wait(), plan.drain)
                    window.release()

                task = asyncio.create_task(release())
                pending.add(task)
                task.add_done_callback(pending.discard)
            for task in list(pending):
                task.cancel()

        ticker = asyncio.create_task(self._tick(stop_at))
        await asyncio.gather(*(sender(room) for room in members.values()))
        ticker.cancel()

    async def _chat(self, members: dict[str, list[Member]]) -> None:
        plan = self.plan
        stop_at = time.monotonic() + plan.duration
        interval = 1.0 / plan.rate

        async def sender(room: list[Member], member: Member, offset: float) -> None:
            await asyncio.sleep(offset)
            number = 0
            next_at = time.monotonic()
            while next_at < stop_at:
                await self._send(len(room), member, number)
                number += 1
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))

        senders = [
            sender(room, member, (i * interval) / max(1, len(members) * plan.senders))
            for room in members.values()
            for i, member in enumerate(room[: plan.senders])
        ]
        ticker = asyncio.create_task(self._tick(stop_at))
        await asyncio.gather(*senders)
        ticker.cancel()

    async def _one_each(self, members: dict[str, list[Member]]) -> None:
        for room in members.values():
            await self._send(len(room), room[0], 0)

    async def _tick(self, stop_at: float) -> None:
        start = time.monotonic()
        while True:
            self.progress("send", min(time.monotonic() - start, stop_at - start), stop_at - start)
            await asyncio.sleep(0.2)

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.plan.drain
        while self.results.received < self.results.expected and time.monotonic() < deadline:
            self.progress("drain", self.results.received, self.results.expected)
            await asyncio.sleep(0.05)
        self.progress("drain", self.results.received, self.results.expected)

    # -- receiving -------------------------------------------------------------------------

    async def _read(self, member: Member) -> None:
        results = self.results
        try:
            async for raw in member.ws:
                now = time.time()
                frame = orjson.loads(raw)
                kind = frame.get("type")
                if kind == "error":
                    results.errors.append(f"{frame.get('code')}: {frame.get('message')}")
                    continue
                if kind != "message":
                    continue
                if member.tally.see(frame["seq"]) == "duplicate":
                    continue
                results.received += 1
                results.last_delivery = time.monotonic()
                sent_at = (frame.get("metadata") or {}).get("t")
                if isinstance(sent_at, float):
                    results.latencies_ms.append((now - sent_at) * 1000)
                cid = frame.get("client_msg_id")
                if frame.get("sender_id") == member.user_id and cid in self._acks:
                    self._acks.pop(cid).set()
        except websockets.ConnectionClosed as exc:
            results.errors.append(f"{member.user_id} closed: {exc}")
