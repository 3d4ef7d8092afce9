#!/usr/bin/env python
"""WebSocket fan-out benchmark: rooms x members, windowed or paced senders, 1 or 2 instances.

    .venv/bin/python bench/ws_fanout.py --backend sqlite|postgres|both \
        [--scenario windowed|many-small] [--bus memory|redis] [--instances 1|2] \
        [--rooms 10 --members 50 --window 20 --duration 10]

Scenarios (`--scenario`; `--rooms`, `--members`, `--senders`, `--window`, `--rate` override):
  windowed    10 rooms x 50 members, member 0 of each room sends as fast as a window of 20
              unacknowledged messages allows (the main scenario, the default).
  many-small  100 rooms x 5 members, every member sends at a steady 2 msgs/s (paced on a
              fixed schedule, not windowed), so 1000 msgs/s are offered in all.

What it does, for each backend:

1. Starts `--instances` `chat-service serve` processes on free 127.0.0.1 ports the way
   every bench script does (bench/harness: a fixed JWT_SECRET_KEY, so it mints tokens
   itself, LOG_LEVEL=WARNING, RATE_LIMIT_ENABLED=false), with WS_MAX_CONNECTIONS raised
   above rooms x members. SQLite lives in a temporary DATA_DIR (one instance only); PostgreSQL
   gets a fresh database (created with asyncpg on BENCH_POSTGRES_URL, default
   postgresql://postgres@127.0.0.1:5432/test, migrated with `chat-service migrate`, dropped
   at the end) that every instance shares, with DATABASE_POOL_SIZE=`--db-pool` and no
   overflow per instance. `--bus memory` leaves REDIS_URL unset (the in-process bus);
   `--bus redis` starts the benchmark's own `redis-server` on a free port (no persistence,
   stopped at the end) and gives every instance its REDIS_URL. Two instances need
   PostgreSQL and Redis.
2. Creates `--rooms` group sessions of `--members` users each over REST, then connects
   every member over WebSocket, `--connect-batch` handshakes at a time, and waits for a
   `pong` on each connection: the server answers `ping` only once the connection is
   attached to the hub, so every connection is known to be live before the first message
   is sent. With two instances the members of each room alternate between them (member i
   of room r goes to instance (r + i) mod 2), senders included.
3. Members 0 .. `--senders`-1 of each room are its senders. For `--duration` seconds each
   sends `message` frames (with a `client_msg_id`), either as fast as a window of
   `--window` unacknowledged messages allows (windowed; a message is acknowledged when its
   sender receives its own echo) or at `--rate` msgs/s on a fixed schedule (many-small;
   the senders' schedules are staggered evenly over one period). Each message carries its
   send time (`metadata.t`, wall clock in µs) so every receiver measures the delivery
   latency (receive time - send time; all processes share the machine's clock).
4. When the time is up it stops sending, waits (bounded by `--drain-timeout`) for the
   senders' own echoes and then for every connection to drain, and prints: messages sent,
   deliveries expected (sent x members: every member of a room, its senders included,
   receives every message of the room), deliveries received, delivered messages/s,
   p50/p99 delivery latency, lost deliveries, and whether every connection got its room's
   messages with seq 1, 2, 3, … (strictly increasing, no gap, no duplicate; a duplicate
   is not counted as received: harness.tally).
   With Redis it reads `INFO commandstats` from its own redis-server just before sending
   starts and again once the last delivery has arrived, and prints the commands Redis
   executed in between (every command, those run inside Lua scripts included, minus the
   benchmark's own INFO) per delivered message, and the PUBLISH calls per message sent.
   It cross-checks over REST that each room stores exactly the number of messages sent,
   and shows the CPU each process used during the sending window, to tell whether the
   servers or the load generator were the limit, plus how busy the rest of the machine
   was (other processes skew the figures; `--wait-quiet` waits for an idle machine first).
   Exit status 1 if any delivery was lost, duplicated or out of order, a send failed or
   the server closed a connection; 2 if the run could not be carried out.

Why the load generator is split the way it is: the servers and the generator share a
2-core machine and are single-threaded Python, so a generator that cannot keep up would
measure itself. The receivers that never send (490 in the windowed scenario) therefore
run in a separate process (`--receiver-procs`, default 1) on the plain `websockets` asyncio
API: `recv(decode=False)` hands raw bytes straight to `orjson.loads`, one task per
connection, no per-frame `wait_for`, uvloop when available, and per-frame work is a seq
comparison, a counter and one integer appended to an array. The senders (10 connections
windowed, 500 in many-small) stay in the main process and use the SDK's
`RealtimeConnection` (automatic reconnect off, so a dropped connection is reported rather
than repaired; websockets' client keepalive off, as on the receivers: `SenderConnection`
says why), read with `receive()` without a timeout (no per-frame `wait_for` task) —
their rate is bounded by the window or the schedule, not by the client. The CPU line of
the report shows the share of a core each process used: if the receiver or sender
process sits near 100 % the figures describe the generator, not the server.

Every wait is bounded; the servers, the redis-server, the receiver processes, the
temporary directory and the PostgreSQL database are cleaned up on success, on errors and
on Ctrl-C/SIGTERM. All traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import math
import multiprocessing as mp
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any

import httpx
import orjson
from harness.clients import API, PING_TIMEOUT, bearer, create_session, open_live, token, ws_url
from harness.machine import HOST, quiet_machine
from harness.meter import Load, Meter
from harness.run import add_run_args, guarded, run_async, stop_child
from harness.server import Server
from harness.stack import Stack, started
from harness.tally import Tally
from websockets.exceptions import ConnectionClosed as WSClosed

from chatservice.client import ConnectionClosed, RealtimeConnection
from chatservice.tally import percentile

# What each scenario means when --rooms/--members/--senders/--window/--rate/--drain-timeout
# are not given. `window` set = windowed senders; `rate` set = paced senders.
SCENARIOS: dict[str, dict[str, Any]] = {
    "windowed": {
        "rooms": 10,
        "members": 50,
        "senders": 1,
        "window": 20,
        "rate": None,
        "drain_timeout": 30.0,
    },
    "many-small": {
        "rooms": 100,
        "members": 5,
        "senders": 5,
        "window": None,
        "rate": 2.0,
        # 1000 msgs/s offered is more than one instance stores: the tail can be long.
        "drain_timeout": 120.0,
    },
}


async def pipe_recv(pipe: Pipe, timeout: float) -> Any:
    """Receive one object from a multiprocessing pipe without blocking the event loop."""
    if not pipe.poll():
        loop = asyncio.get_running_loop()
        readable: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not readable.done():
                readable.set_result(None)

        loop.add_reader(pipe.fileno(), wake)
        try:
            await asyncio.wait_for(readable, timeout)
        finally:
            loop.remove_reader(pipe.fileno())
            # uvloop leaves the descriptor non-blocking; Connection.recv/send need blocking.
            os.set_blocking(pipe.fileno(), True)
    return pipe.recv()


async def redis_calls(client: Any) -> dict[str, int]:
    """Calls per command since redis-server started (`INFO commandstats`)."""
    stats = await asyncio.wait_for(client.info("commandstats"), 10)
    return {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in stats.items()
        if isinstance(value, dict) and "calls" in value
    }


# ---------------------------------------------------------------------------------------
# receiver processes: plain websockets + orjson, one task per connection
# ---------------------------------------------------------------------------------------


@dataclass
class Member:
    room: int
    session_id: str
    user_id: str
    url: str


class Seen(Tally):
    """What one connection saw of its room's messages."""

    __slots__ = ("closed", "room")

    def __init__(self, room: int) -> None:
        super().__init__()
        self.room = room
        self.closed: str | None = None  # set if the server closed the connection


async def _read_loop(ws: Any, tally: Seen, latencies: array.array[int], clock: list[int]) -> None:
    loads = orjson.loads
    now_ns = time.time_ns
    recv = ws.recv
    append = latencies.append
    try:
        while True:
            raw = await recv(decode=False)
            received = now_ns()
            frame = loads(raw)
            if frame.get("type") != "message":
                continue
            tally.see(frame["seq"])
            meta = frame.get("metadata")
            if meta and "t" in meta:
                append(received // 1000 - meta["t"])
            clock[0] = received
    except WSClosed as exc:
        rcvd = exc.rcvd
        tally.closed = f"{rcvd.code} {rcvd.reason}" if rcvd else "connection lost"


async def _receiver_main(pipe: Pipe, members: list[Member], opts: dict[str, Any]) -> None:
    compression = opts["compression"]
    batch = opts["connect_batch"]
    sockets: list[Any] = []
    tallies: list[Seen] = []
    failures: list[str] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        for start in range(0, len(members), batch):
            chunk = members[start : start + batch]
            opened = await asyncio.gather(
                *(open_live(m.url, compression, opts["connect_timeout"]) for m in chunk),
                return_exceptions=True,
            )
            for member, result in zip(chunk, opened, strict=True):
                if isinstance(result, BaseException):
                    failures.append(f"{member.user_id}: {type(result).__name__}: {result}")
                else:
                    sockets.append(result)
                    tallies.append(Seen(member.room))
        latencies: array.array[int] = array.array("q")
        clock = [0]
        tasks = [
            asyncio.create_task(_read_loop(ws, tally, latencies, clock))
            for ws, tally in zip(sockets, tallies, strict=True)
        ]
        pipe.send(("ready", len(sockets), failures))

        command = await pipe_recv(pipe, opts["command_timeout"])
        if command[0] != "expect":
            return
        _, expected, drain_timeout = command
        deadline = time.monotonic() + drain_timeout
        while time.monotonic() < deadline:
            if all(t.received >= expected.get(t.room, 0) or t.closed for t in tallies):
                break
            await asyncio.sleep(0.05)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        pipe.send(
            (
                "result",
                {
                    "counts": [(t.room, t.received) for t in tallies],
                    "gaps": sum(t.gaps for t in tallies),
                    "duplicates": sum(t.duplicates for t in tallies),
                    "bad": [
                        f"room {t.room}: {t.first_problem}" for t in tallies if t.first_problem
                    ][:5],
                    "closed": [f"room {t.room}: {t.closed}" for t in tallies if t.closed][:5],
                    "closed_count": sum(1 for t in tallies if t.closed),
                    "last_ns": clock[0],
                    "latencies": latencies.tobytes(),
                },
            )
        )
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(
            *(asyncio.wait_for(ws.close(), 2) for ws in sockets), return_exceptions=True
        )


def receiver_process(pipe: Pipe, members: list[Member], opts: dict[str, Any]) -> None:
    # Ctrl-C reaches the whole process group; the parent decides when this process ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        run_async(_receiver_main(pipe, members, opts))
    except (EOFError, BrokenPipeError, TimeoutError):
        pass  # the parent went away or gave up on us
    except Exception as exc:
        with contextlib.suppress(Exception):
            pipe.send(("error", f"{type(exc).__name__}: {exc}"))


@dataclass
class Worker:
    process: mp.process.BaseProcess
    pipe: Pipe
    size: int

    def stop(self) -> None:
        stop_child(self.process, self.pipe, ("abort",), 5)


# ---------------------------------------------------------------------------------------
# senders: the SDK's RealtimeConnection, in the main process
# ---------------------------------------------------------------------------------------


@dataclass
class Sender:
    room: int
    slot: int  # which of the room's senders (member index)
    user_id: str
    live: RealtimeConnection
    window: asyncio.Semaphore | None  # None: paced, not windowed
    tally: Seen
    sent: int = 0
    pending: set[str] = field(default_factory=set)
    latencies: list[int] = field(default_factory=list)
    # For the sender's own echoes: (server timestamp - send time, echo - server timestamp)
    # in µs. The server stamps a message inside its write transaction, once it holds the
    # session row (PostgreSQL's clock_timestamp()) or the write lock (SQLite).
    split: list[tuple[int, int]] = field(default_factory=list)
    # Paced senders: how late each send left against its schedule, in seconds.
    lags: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    last_ns: int = 0


class SenderConnection(RealtimeConnection):
    """The SDK's connection with websockets' client keepalive turned off, as for the
    receivers. The server reads a connection's frames one at a time, and uvicorn stops
    reading the socket until the app takes the frame in hand, so a keepalive ping waits
    behind every frame the sender wrote before it. When more is offered than the server
    stores (many-small), that wait passes websockets' 20 s ping timeout: the generator
    would close its own connection (1011), and the frames written but not yet read would
    never be stored. `--sender-keepalive` keeps the SDK's default to show that."""

    async def connect(self) -> RealtimeConnection:
        await super().connect()
        keepalive = self._socket().keepalive_task
        if keepalive is not None:
            keepalive.cancel()
        return self


async def sender_reader(sender: Sender) -> None:
    """Count what the sender's connection receives, and free a window slot per own echo.

    Runs until cancelled or the connection closes; `receive()` without a timeout adds no
    per-frame `wait_for` task."""
    while True:
        try:
            frame = await sender.live.receive()
        except ConnectionClosed as exc:
            sender.tally.closed = f"{exc.code} {exc.reason}"
            return
        received = time.time_ns()
        kind = frame.get("type")
        if kind == "message":
            sender.tally.see(frame["seq"])
            meta = frame.get("metadata") or {}
            if "t" in meta:
                sender.latencies.append(received // 1000 - meta["t"])
            sender.last_ns = received
            ref = frame.get("client_msg_id")
            if frame.get("sender_id") == sender.user_id and ref in sender.pending:
                sender.pending.discard(ref)
                if sender.window is not None:
                    sender.window.release()
                with contextlib.suppress(KeyError, TypeError, ValueError):
                    stamped = int(datetime.fromisoformat(frame["timestamp"]).timestamp() * 1e6)
                    sender.split.append((stamped - meta["t"], received // 1000 - stamped))
        elif kind == "error":
            sender.errors.append(f"{frame.get('code')}: {frame.get('message')}")
            ref = frame.get("client_msg_id")
            if ref in sender.pending:
                sender.pending.discard(ref)
                if sender.window is not None:
                    sender.window.release()


async def send_one(sender: Sender, n: int, text: str) -> bool:
    """Send message `n` of this sender; False once its connection is gone."""
    ref = f"r{sender.room}-s{sender.slot}-{n}"
    sender.pending.add(ref)
    try:
        await sender.live.send_message(
            text, client_msg_id=ref, metadata={"t": time.time_ns() // 1000}
        )
    except (WSClosed, ConnectionClosed) as exc:
        # This sender is done; the report says why.
        sender.pending.discard(ref)
        sender.errors.append(f"connection closed while sending: {exc}")
        return False
    sender.sent += 1
    return True


async def sender_writer(sender: Sender, end_at: float) -> None:
    """Send as fast as the window allows until `end_at` (loop time)."""
    assert sender.window is not None
    loop = asyncio.get_running_loop()
    n = 0
    text = f"bench message from room {sender.room}"
    while (remaining := end_at - loop.time()) > 0:
        try:
            await asyncio.wait_for(sender.window.acquire(), remaining)
        except TimeoutError:
            break
        if loop.time() >= end_at:
            sender.window.release()
            break
        n += 1
        if not await send_one(sender, n, text):
            break


async def paced_writer(sender: Sender, first_at: float, period: float, end_at: float) -> None:
    """Send one message every `period` s from `first_at` until `end_at` (loop time),
    whether or not earlier ones were answered; a late send goes at once (no skipping)."""
    loop = asyncio.get_running_loop()
    n = 0
    text = f"bench message from room {sender.room} sender {sender.slot}"
    due = first_at
    while due < end_at:
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        sender.lags.append(max(0.0, loop.time() - due))
        n += 1
        if not await send_one(sender, n, text):
            break
        due = first_at + n * period


async def connect_senders(
    servers: list[Server],
    rooms: list[tuple[str, list[str]]],
    args: argparse.Namespace,
    senders: list[Sender],
    readers: list[asyncio.Task[None]],
) -> None:
    """Connect every room's senders, `--connect-batch` at a time, each proven live by a
    pong, and start reading each at once: a connection nobody reads stops reading its
    socket once its queue is full, then misses its keepalive pongs and is closed.
    Appends to `senders` and `readers` as it goes, so the caller can clean up after a
    failure."""
    specs = [
        (room, slot, session_id, users[slot])
        for room, (session_id, users) in enumerate(rooms)
        for slot in range(args.senders)
    ]

    async def one(room: int, slot: int, session_id: str, user: str) -> None:
        # No automatic reconnect: a connection the server drops must show up in the
        # report, not be repaired behind the measurement's back.
        kind = RealtimeConnection if args.sender_keepalive else SenderConnection
        live = kind(member_base_url(servers, room, slot), session_id, token(user), reconnect=False)
        await asyncio.wait_for(live.connect(), 10)
        window = asyncio.Semaphore(args.window) if args.window else None
        sender = Sender(room, slot, user, live, window, Seen(room))
        senders.append(sender)
        await live.ping()
        await live.receive_until("pong", timeout=PING_TIMEOUT)
        readers.append(asyncio.create_task(sender_reader(sender)))

    for start in range(0, len(specs), args.connect_batch):
        done = await asyncio.gather(
            *(one(*spec) for spec in specs[start : start + args.connect_batch]),
            return_exceptions=True,
        )
        failures = [r for r in done if isinstance(r, BaseException)]
        if failures:
            raise RuntimeError(
                f"{len(failures)} senders failed to connect, first: "
                f"{type(failures[0]).__name__}: {failures[0]}"
            )


# ---------------------------------------------------------------------------------------
# one run
# ---------------------------------------------------------------------------------------


@dataclass
class Result:
    backend: str
    scenario: str
    bus: str
    instances: int
    rooms: int
    members: int
    senders: int  # per room
    window: int | None
    rate: float | None
    duration: float
    sent: int = 0
    expected: int = 0
    received: int = 0
    stored: int = 0
    send_seconds: float = 0.0
    delivery_seconds: float = 0.0
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    max_ms: float = math.nan
    gaps: int = 0
    duplicates: int = 0
    closed: int = 0
    send_errors: int = 0
    problems: list[str] = field(default_factory=list)
    # While sending: CPU of each process, the whole machine (PostgreSQL included), the
    # busiest other processes; how busy the machine was just before; the servers' RSS.
    load: Load = field(default_factory=lambda: Load({}, 0.0, 0.0, "", {}))
    code: str = ""  # git commit of the server code
    to_server_p50_ms: float = math.nan
    server_to_echo_p50_ms: float = math.nan
    lag_p99_ms: float = math.nan  # paced senders: lateness against the schedule
    lag_max_ms: float = math.nan
    # Redis: calls per command between just before sending and the last delivery.
    redis_calls: dict[str, int] | None = None
    # Messages sent per room, by the instance its first sender is connected to.
    room_sent: dict[str, list[int]] = field(default_factory=dict)

    @property
    def lost(self) -> int:
        return self.expected - self.received

    @property
    def delivered_per_second(self) -> float:
        return self.received / self.delivery_seconds if self.delivery_seconds > 0 else 0.0

    @property
    def redis_total(self) -> int:
        return sum(self.redis_calls.values()) if self.redis_calls else 0

    @property
    def redis_per_delivery(self) -> float:
        if self.redis_calls is None or not self.received:
            return math.nan
        return self.redis_total / self.received

    @property
    def publish_per_message(self) -> float:
        if self.redis_calls is None or not self.sent:
            return math.nan
        return self.redis_calls.get("publish", 0) / self.sent

    @property
    def label(self) -> str:
        instances = f"{self.instances} instance{'s' if self.instances > 1 else ''}"
        return f"{self.backend}, {self.bus} bus, {instances}, {self.scenario}"

    @property
    def ok(self) -> bool:
        return (
            self.sent > 0
            and self.lost == 0
            and self.gaps == 0
            and self.duplicates == 0
            and self.closed == 0
            and self.send_errors == 0
            and self.stored == self.sent
            and not self.problems
        )

    def report(self) -> str:
        conns = self.rooms * self.members
        order = (
            f"ok ({conns} connections, seq strictly increasing from 1, no gap, no duplicate)"
            if self.gaps == 0 and self.duplicates == 0 and self.lost == 0
            else f"FAILED (gaps {self.gaps}, duplicates {self.duplicates}, lost {self.lost})"
        )
        load = self.load
        cpu = "  ".join(f"{name} {share:.0%}" for name, share in load.cpu.items())
        rss = " + ".join(f"{mib:.0f}" for mib in load.rss.values())
        who = f"{self.senders} sender{'s' if self.senders > 1 else ''}/room"
        if self.rate is not None:
            sending = f"{who} at {self.rate:g} msgs/s each (paced)"
            offered = self.rate * self.senders * self.rooms
        else:
            sending = f"{who}, window {self.window}"
            offered = 0.0
        sent = f"messages sent:            {self.sent}"
        if self.send_seconds:
            sent += f" ({self.sent / self.send_seconds:.0f}/s"
            if offered:
                sent += (
                    f"; offered {offered:.0f}/s, send lateness p99 {self.lag_p99_ms:.1f} ms, "
                    f"max {self.lag_max_ms:.1f} ms"
                )
            sent += ")"
        per_room = ", ".join(
            f"{name} {min(counts)}-{max(counts)}" for name, counts in self.room_sent.items()
        )
        lines = [
            f"== {self.label}: {self.rooms} rooms x {self.members} members ({conns} "
            f"connections), {sending}, {self.duration:g} s of sending",
            f"server code:              {self.code}",
            sent,
            f"sent per room:            {per_room or '-'} (min-max, rooms grouped by the "
            "instance of their first sender)",
            f"deliveries expected:      {self.expected} (sent x {self.members} members, "
            "sender echo included)",
            f"deliveries received:      {self.received}",
            f"delivered messages/s:     {self.delivered_per_second:.0f} "
            f"(over {self.delivery_seconds:.2f} s, first send to last delivery)",
            f"delivery latency:         p50 {self.p50_ms:.1f} ms   p99 {self.p99_ms:.1f} ms   "
            f"max {self.max_ms:.1f} ms",
            f"lost deliveries:          {self.lost}",
            f"order check:              {order}",
            f"stored (REST total):      {self.stored} of {self.sent} sent",
        ]
        if self.redis_calls is not None:
            top = sorted(self.redis_calls.items(), key=lambda item: (-item[1], item[0]))
            lines += [
                f"redis commands:           {self.redis_total} from just before sending to the "
                f"last delivery = {self.redis_per_delivery:.3f} per delivered message",
                f"redis PUBLISH:            {self.redis_calls.get('publish', 0)} = "
                f"{self.publish_per_message:.3f} per message sent",
                "redis commands by name:   "
                + (", ".join(f"{name} {calls}" for name, calls in top[:8] if calls) or "-"),
            ]
        lines += [
            f"sender echo, p50:         send -> server timestamp {self.to_server_p50_ms:.1f} ms, "
            f"server timestamp -> echo {self.server_to_echo_p50_ms:.1f} ms",
            f"cpu during sending:       {cpu} (share of one core); server RSS {rss} MiB",
            f"machine (all processes):  {load.machine:.2f} of {os.cpu_count()} cores busy "
            f"while sending, {load.others:.2f} of them outside this benchmark; "
            f"{load.before:.2f} busy just before",
            f"busiest other processes:  {load.outsiders or '-'}",
        ]
        if self.closed:
            lines.append(f"connections closed by the server: {self.closed}")
        if self.send_errors:
            lines.append(f"send errors:              {self.send_errors}")
        lines.extend(f"problem: {p}" for p in self.problems)
        lines.append(f"result:                   {'OK' if self.ok else 'FAILED'}")
        return "\n".join(lines)


async def create_rooms(
    http: httpx.AsyncClient, args: argparse.Namespace, run_id: str
) -> list[tuple[str, list[str]]]:
    """`rooms` group sessions; member 0 creates the room and is its sender."""

    async def one(room: int) -> tuple[str, list[str]]:
        users = [f"bench-{run_id}-r{room}-u{i}" for i in range(args.members)]
        session_id = await create_session(
            http, token(users[0]), title=f"bench room {room}", kind="group", participants=users[1:]
        )
        return session_id, users

    rooms: list[tuple[str, list[str]]] = []
    for start in range(0, args.rooms, 10):
        rooms.extend(
            await asyncio.gather(*(one(r) for r in range(start, min(args.rooms, start + 10))))
        )
    return rooms


async def stored_counts(http: httpx.AsyncClient, rooms: list[tuple[str, list[str]]]) -> int:
    async def one(session_id: str, owner: str) -> int:
        response = await http.get(
            f"{API}/sessions/{session_id}/messages",
            params={"limit": 1},
            headers=bearer(token(owner)),
        )
        response.raise_for_status()
        return int(response.json()["total"])

    total = 0
    for start in range(0, len(rooms), 10):
        chunk = rooms[start : start + 10]
        total += sum(await asyncio.gather(*(one(sid, users[0]) for sid, users in chunk)))
    return total


def member_instance(instances: int, room: int, index: int) -> int:
    """Members of a room alternate between the instances, senders included; the offset by
    room spreads rooms with one sender over both instances too."""
    return (room + index) % instances


def member_base_url(servers: list[Server], room: int, index: int) -> str:
    return servers[member_instance(len(servers), room, index)].base_url


def _split(items: list[Member], parts: int) -> Iterator[list[Member]]:
    for i in range(parts):
        chunk = items[i::parts]
        if chunk:
            yield chunk


async def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll `condition` every 50 ms for at most `timeout` s; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.05)
    return condition()


async def bench(stack: Stack, backend: str, args: argparse.Namespace) -> Result:
    servers, redis_server = stack.servers, stack.redis
    result = Result(
        backend,
        args.scenario,
        args.bus,
        len(servers),
        args.rooms,
        args.members,
        args.senders,
        args.window,
        args.rate,
        args.duration,
    )
    run_id = uuid.uuid4().hex[:6]
    compression = None if args.compression == "none" else "deflate"
    http = httpx.AsyncClient(base_url=servers[0].base_url, timeout=30)
    rooms = await create_rooms(http, args, run_id)

    receivers: list[Member] = []
    for room, (session_id, users) in enumerate(rooms):
        for index, user in enumerate(users):
            if index < args.senders:
                continue
            url = ws_url(member_base_url(servers, room, index), session_id, token(user))
            receivers.append(Member(room, session_id, user, url))

    ctx = mp.get_context("spawn")
    workers: list[Worker] = []
    senders: list[Sender] = []
    reader_tasks: list[asyncio.Task[None]] = []
    redis_client: Any = None
    # Bounds the receivers' wait for their next command, so it covers --wait-quiet too.
    command_timeout = args.wait_quiet + args.duration + 3 * args.drain_timeout + 120
    try:
        for chunk in _split(receivers, args.receiver_procs):
            parent, child = ctx.Pipe()
            process = ctx.Process(
                target=receiver_process,
                args=(
                    child,
                    chunk,
                    {
                        "compression": compression,
                        "connect_batch": args.connect_batch,
                        "connect_timeout": 10.0,
                        "command_timeout": command_timeout,
                    },
                ),
                daemon=True,
                name="bench-receivers",
            )
            process.start()
            child.close()
            workers.append(Worker(process, parent, len(chunk)))

        # Senders connect while the receivers do.
        await connect_senders(servers, rooms, args, senders, reader_tasks)

        connect_timeout = 60 + len(receivers) / max(1, args.connect_batch) * 15
        for worker in workers:
            message = await pipe_recv(worker.pipe, connect_timeout)
            if message[0] != "ready":
                raise RuntimeError(f"receiver process failed: {message[1]}")
            _, connected, failures = message
            if connected != worker.size:
                raise RuntimeError(
                    f"only {connected} of {worker.size} receivers connected; first failures: "
                    + "; ".join(failures[:3])
                )
        print(
            f"[{result.label}] {len(receivers) + len(senders)} connections live, sending for "
            f"{args.duration:g} s ...",
            flush=True,
        )

        loop = asyncio.get_running_loop()
        pids = {server.name: server.pid for server in servers}
        pids["senders"] = os.getpid()
        pids.update({f"receivers{i or ''}": w.process.pid or 0 for i, w in enumerate(workers)})
        if redis_server is not None:
            pids["redis"] = redis_server.pid
        meter = Meter(pids, stack.database, servers)
        meter.before = await quiet_machine(args.wait_quiet)
        redis_before: dict[str, int] = {}
        if redis_server is not None:
            from redis.asyncio import Redis

            # One connection for both readings: its handshake happens before the first.
            redis_client = Redis(host=HOST, port=redis_server.port, socket_timeout=10)
            redis_before = await redis_calls(redis_client)
        await meter.start(None)
        start_ns = time.time_ns()
        start = loop.time()
        end_at = start + args.duration
        if args.rate is not None:
            period = 1.0 / args.rate
            # Staggered evenly over one period: a steady stream, not bursts.
            writers = [
                paced_writer(s, start + period * i / len(senders), period, end_at)
                for i, s in enumerate(senders)
            ]
        else:
            writers = [sender_writer(s, end_at) for s in senders]
        await asyncio.gather(*writers)
        result.send_seconds = loop.time() - start
        result.load = await meter.stop()
        lags = [lag for s in senders for lag in s.lags]
        if lags:
            result.lag_p99_ms = percentile(lags, 0.99) * 1000
            result.lag_max_ms = max(lags) * 1000

        # Drain the senders' own echoes (windows, paced sends in flight), bounded.
        await wait_until(
            lambda: not any(s.pending and not s.tally.closed for s in senders),
            args.drain_timeout,
        )
        unacknowledged = sum(1 for s in senders if s.pending and not s.tally.closed)
        if unacknowledged:
            result.problems.append(
                f"{unacknowledged} senders still had unacknowledged messages after "
                f"{args.drain_timeout:g} s"
            )

        expected_per_room = dict.fromkeys(range(len(rooms)), 0)
        for s in senders:
            expected_per_room[s.room] += s.sent
        result.sent = sum(expected_per_room.values())
        for room, count in expected_per_room.items():
            name = servers[member_instance(len(servers), room, 0)].name
            result.room_sent.setdefault(name, []).append(count)
        result.expected = result.sent * args.members
        result.send_errors = sum(len(s.errors) for s in senders)
        for s in senders:
            result.problems.extend(
                f"room {s.room} sender {s.slot} send error: {e}" for e in s.errors[:3]
            )

        for worker in workers:
            worker.pipe.send(("expect", expected_per_room, args.drain_timeout))
        # The senders' connections receive the other senders' messages of their room too.
        await wait_until(
            lambda: all(
                s.tally.received >= expected_per_room[s.room] or s.tally.closed for s in senders
            ),
            args.drain_timeout,
        )
        latencies: list[int] = []
        last_ns = max((s.last_ns for s in senders), default=0)
        split = [pair for s in senders for pair in s.split]
        if split:
            result.to_server_p50_ms = percentile((a for a, _ in split), 0.5) / 1000
            result.server_to_echo_p50_ms = percentile((b for _, b in split), 0.5) / 1000
        for s in senders:
            latencies.extend(s.latencies)
            result.received += s.tally.received
            result.gaps += s.tally.gaps
            result.duplicates += s.tally.duplicates
            if s.tally.first_problem:
                result.problems.append(f"room {s.room} sender {s.slot}: {s.tally.first_problem}")
            if s.tally.closed:
                result.closed += 1
                result.problems.append(f"room {s.room} sender {s.slot} closed: {s.tally.closed}")
        for worker in workers:
            message = await pipe_recv(worker.pipe, args.drain_timeout + 60)
            if message[0] != "result":
                raise RuntimeError(f"receiver process failed: {message[1]}")
            data = message[1]
            result.received += sum(count for _, count in data["counts"])
            result.gaps += data["gaps"]
            result.duplicates += data["duplicates"]
            result.closed += data["closed_count"]
            result.problems.extend(data["bad"])
            result.problems.extend(f"closed by server: {c}" for c in data["closed"])
            last_ns = max(last_ns, data["last_ns"])
            chunk_latencies: array.array[int] = array.array("q")
            chunk_latencies.frombytes(data["latencies"])
            latencies.extend(chunk_latencies)
        if redis_client is not None:
            redis_after = await redis_calls(redis_client)
            result.redis_calls = {
                name: calls - redis_before.get(name, 0)
                for name, calls in redis_after.items()
                if name != "info"  # the benchmark's own readings
            }

        result.delivery_seconds = (last_ns - start_ns) / 1e9 if last_ns else 0.0
        latencies.sort()
        result.p50_ms = percentile(latencies, 0.50) / 1000
        result.p99_ms = percentile(latencies, 0.99) / 1000
        result.max_ms = latencies[-1] / 1000 if latencies else math.nan
        if len(latencies) != result.received:
            result.problems.append(
                f"{result.received - len(latencies)} deliveries carried no send time"
            )
        async with httpx.AsyncClient(base_url=servers[-1].base_url, timeout=30) as last:
            result.stored = await stored_counts(last, rooms)
        return result
    finally:
        for task in reader_tasks:
            task.cancel()
        await asyncio.gather(*reader_tasks, return_exceptions=True)
        await asyncio.gather(
            *(asyncio.wait_for(s.live.close(), 2) for s in senders), return_exceptions=True
        )
        for worker in workers:
            worker.stop()
        await http.aclose()
        if redis_client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(redis_client.aclose(), 2)


def run_backend(backend: str, args: argparse.Namespace) -> Result:
    def profile(name: str) -> Path | None:
        if not args.server_profile:
            return None
        return Path(f"{args.server_profile}.{backend}{name.removeprefix('server')}").resolve()

    with started(
        backend=backend,
        names=["server", "server2"][: args.instances],
        redis=args.bus == "redis",
        max_connections=max(1000, 2 * args.rooms * args.members),
        db_pool=args.db_pool,
        profile=profile,
        prefix=f"chat-bench-{backend}",
        keep=args.keep,
        verbose=args.verbose,
    ) as stack:
        result = run_async(bench(stack, backend, args))
        result.problems += stack.problems()
        if args.verbose:
            for server in stack.servers:
                print(f"{server.name} log (tail):\n{server.log_tail()}", file=sys.stderr)
    result.code = stack.code
    return result


def summary_table(results: list[Result]) -> str:
    head = (
        "| backend | scenario | bus | inst | sent | expected | received | delivered msgs/s "
        "| p50 ms | p99 ms | lost | order | redis cmds/delivery | PUBLISH/msg "
        "| other load (cores) |\n"
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"
    )

    def redis(value: float) -> str:
        return "-" if math.isnan(value) else f"{value:.3f}"

    rows = [
        f"| {r.backend} | {r.scenario} | {r.bus} | {r.instances} | {r.sent} | {r.expected} | "
        f"{r.received} | {r.delivered_per_second:.0f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | "
        f"{r.lost} | {'ok' if r.gaps == 0 and r.duplicates == 0 else 'FAILED'} | "
        f"{redis(r.redis_per_delivery)} | {redis(r.publish_per_message)} | {r.load.others:.2f} |"
        for r in results
    ]
    return "\n".join([head, *rows])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="WebSocket fan-out benchmark for chat-service (see the module docstring)."
    )
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument(
        "--scenario",
        choices=sorted(SCENARIOS),
        default="windowed",
        help="windowed: 10 rooms x 50 members, 1 windowed sender per room; many-small: "
        "100 rooms x 5 members, 5 senders per room at 2 msgs/s each (paced)",
    )
    parser.add_argument(
        "--bus",
        choices=["memory", "redis"],
        default="memory",
        help="memory: the in-process bus (no REDIS_URL); redis: the benchmark's own "
        "redis-server on a free port",
    )
    parser.add_argument(
        "--instances",
        type=int,
        choices=[1, 2],
        default=1,
        help="chat-service processes sharing the database and Redis (2 needs postgres + "
        "redis); each room's members alternate between them",
    )
    parser.add_argument("--rooms", type=int, help="default: 10 windowed, 100 many-small")
    parser.add_argument("--members", type=int, help="per room, senders included; default: 50 / 5")
    parser.add_argument("--senders", type=int, help="senders per room; default: 1 / 5")
    parser.add_argument(
        "--window", type=int, help="unacknowledged messages/sender (windowed); default 20"
    )
    parser.add_argument(
        "--rate", type=float, help="msgs/s per sender, paced (many-small); default 2"
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of sending")
    parser.add_argument(
        "--drain-timeout",
        type=float,
        help="bound on waiting for the tail; default: 30 windowed, 120 many-small",
    )
    parser.add_argument("--connect-batch", type=int, default=25, help="handshakes at a time")
    parser.add_argument("--receiver-procs", type=int, default=1, help="receiver processes")
    parser.add_argument(
        "--compression",
        choices=["deflate", "none"],
        default="deflate",
        help="permessage-deflate on the receivers' connections (deflate = websockets' and "
        "browsers' default; the SDK senders always use the default)",
    )
    parser.add_argument(
        "--sender-keepalive",
        action="store_true",
        help="keep websockets' default client keepalive (20 s ping timeout) on the senders' "
        "connections; off by default, as on the receivers'",
    )
    add_run_args(parser, "PATH.<backend>, PATH.<backend>2 for the second instance")
    args = parser.parse_args(argv)
    preset = SCENARIOS[args.scenario]
    if args.scenario == "windowed" and args.rate is not None:
        parser.error("--rate is for --scenario many-small (windowed senders use --window)")
    if args.scenario == "many-small" and args.window is not None:
        parser.error("--window is for --scenario windowed (many-small senders use --rate)")
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.rooms < 1 or args.members < 2 or args.duration <= 0:
        parser.error("need rooms >= 1, members >= 2, duration > 0")
    if not 1 <= args.senders <= args.members:
        parser.error("need 1 <= senders <= members")
    if (args.window is not None and args.window < 1) or (args.rate is not None and args.rate <= 0):
        parser.error("need window >= 1 and rate > 0")
    if args.receiver_procs < 1 or args.connect_batch < 1 or args.db_pool < 1:
        parser.error("need receiver-procs >= 1, connect-batch >= 1 and db-pool >= 1")
    if args.instances > 1 and args.backend != "postgres":
        parser.error("SQLite serves one instance only: --instances 2 needs --backend postgres")
    if args.instances > 1 and args.bus != "redis":
        parser.error("instances share messages only through Redis: --instances 2 needs --bus redis")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]

    def run_all() -> int:
        results: list[Result] = []
        for backend in backends:
            result = run_backend(backend, args)
            print(result.report(), flush=True)
            results.append(result)
        print()
        print(summary_table(results))
        return 0 if results and all(r.ok for r in results) else 1

    return guarded(run_all, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
