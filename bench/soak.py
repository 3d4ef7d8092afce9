#!/usr/bin/env python
"""Soak test: an hour of steady mixed traffic on two instances (PostgreSQL + Redis).

    .venv/bin/python bench/soak.py [--duration 3600] [--chat-service PATH] \
        [--rooms 30 --members 10 --agent-sessions 20 --agent-devices 2] \
        [--ws-rate 20 --rest-rate 8 --agent-interval 2 --upload-interval 3 \
         --reconnect-interval 1] [--sample-interval 10] [--out-dir soak-out] \
        [--csv PATH --plot PATH --summary PATH]

What it does:

1. Starts, as every bench script does (bench/harness), its own `redis-server` on a free
   port (no persistence), creates a fresh PostgreSQL database `soak_<random>` on
   SOAK_POSTGRES_URL's server (default postgresql://postgres@127.0.0.1:5432/postgres; the
   database in that URL is only used for the admin connection), runs `chat-service
   migrate` on it, then starts TWO `chat-service serve --port P` processes with the same
   DATABASE_URL, REDIS_URL and a fixed JWT_SECRET_KEY (the script mints its own tokens),
   one shared DATA_DIR (so either instance serves any file from DATA_DIR/storage),
   LOG_LEVEL=WARNING, RATE_LIMIT_ENABLED=false, WS_MAX_CONNECTIONS=2000 and a fixed
   database pool per instance (`--db-pool` + `--db-overflow`, 10 + 10 by default: the
   PostgreSQL server is shared). Every other setting is the service's default: the
   caller's DEBUG, SERVICE_PORT, DATABASE_*, REDIS_*, WS_*, RATE_LIMIT*, FILE_STORAGE*,
   S3_* and STREAM_* are left out. `--chat-service` names the
   executable (default: the `chat-service` beside this Python), so a frozen checkout's
   venv can be soaked while the script lives elsewhere.
2. Creates `--rooms` group sessions of `--members` users, and `--agent-sessions` sessions
   with `"agent_id": 1` (the built-in demo agent, which streams an answer to every user
   message), each owned by one user with `--agent-devices` WebSocket connections. Every
   member of a group room has one WebSocket connection ("device"); devices alternate
   between the two instances. Connections offer permessage-deflate, like browsers do.
3. For `--duration` seconds, on fixed schedules (each operation its own task, so a slow
   one never delays the next):
     - `--ws-rate` msgs/s: a random member of a random group room sends a `message` frame
       with a `client_msg_id` and its send time (`metadata.t`); it is acknowledged when the
       sender's device gets its own echo back (live, or in a `since_seq` replay);
     - `--rest-rate` msgs/s: POST /api/chat/sessions/{id}/messages on a random instance;
       acknowledged by the 201;
     - every `--agent-interval` s: a question to a random agent session, alternately over
       WebSocket and REST; every device of the session must see `stream_start`,
       `stream_chunk` 0, 1, 2, … and `stream_end` (status completed), or, when it was
       disconnected meanwhile, the resumed stream or the stored answer in its replay;
     - every `--upload-interval` s: POST /api/chat/sessions/{id}/files with a small PNG or
       a text file (alternately), acknowledged by the 201 with its seq; the file (and the
       PNG's thumbnail) is then downloaded from the OTHER instance and compared;
     - every `--reconnect-interval` s: a random open device closes its WebSocket, waits
       0..`--reconnect-gap` s while the room keeps talking, and reconnects with
       `since_seq` = the last seq it saw, to either instance at random.
   A device the server disconnects on its own (e.g. 4008) is counted and reconnected the
   same way.
4. Every `--sample-interval` s writes a CSV row: for EACH instance VmRSS
   (/proc/PID/status), open file descriptors (entries of /proc/PID/fd), threads and CPU;
   PostgreSQL connections to the soak database (pg_stat_activity, from an admin
   connection to another database, so it does not count itself); Redis connected_clients
   (INFO clients; it includes the sampler's own connection), used_memory and key count;
   the machine's CPU use (other work shares it); and the traffic so far and the p50/p99
   delivery latency over the interval (live deliveries only, replays excluded).
5. After the duration: stops the traffic, reconnects every device, waits (bounded by
   `--drain-timeout`) until every device has seen its room's last seq and every question
   has its answer, and then checks:
     - every device saw every seq of its room after the seq it first connected at
       (`message` and `stream_end` frames carry seqs), in increasing order, with no
       duplicate (harness.tally, remembering every seq across reconnects); "lost"
       counts acknowledged messages a device never got;
     - over REST, every room's history is gap-free and holds every acknowledged
       message; every question in an agent session has exactly one stored answer
       (`reply_to`), completed;
     - server logs: WARNING/ERROR/CRITICAL lines, grouped;
   and "flat after warm-up" for each resource: the mean of the first `--window` s after
   a `--warmup` s warm-up against the mean of the last `--window` s, plus the
   least-squares slope per hour over everything after the warm-up (the windows scale
   down with short runs: 5 and 10 minutes of an hour).
6. Writes the CSV, a JSON summary and a PNG with one panel per metric over time (the
   plotting imports matplotlib lazily; without it only the PNG is skipped), stops
   everything, drops the database, and prints the report. Exit status 1 if anything was
   lost, duplicated, out of order or unanswered, 2 if the run could not be carried out.
   The exit status does not depend on the flatness verdicts: they are reported, not judged.
   `--replot CSV` starts nothing: it recomputes the flatness lines from an earlier run's
   CSV and redraws `--plot` (the RSS panel's axis does not start at 0, so creep shows).

The load generator is one asyncio process (uvloop when available). All traffic goes to
127.0.0.1; the servers, the redis-server and the database are cleaned up on success, on
errors and on Ctrl-C/SIGTERM.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import csv
import hashlib
import io
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import asyncpg  # type: ignore[import-untyped]
import httpx
import orjson
import redis.asyncio as aioredis
import websockets
from harness.clients import bearer, create_session, token
from harness.machine import HOST, cpu_seconds, machine_cpu, proc_status
from harness.run import interrupt_on_signals, run_async
from harness.server import BASE_SCRUB, Server
from harness.stack import Stack, started
from harness.tally import Tally
from PIL import Image
from websockets.exceptions import ConnectionClosed

from chatservice.tally import percentile

SOAK_ADMIN_URL = os.environ.get(
    "SOAK_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
# Nothing of the caller's service configuration leaks into the servers.
SOAK_SCRUB = (
    *BASE_SCRUB,
    *("SERVICE_PORT", "WS_", "RATE_LIMIT", "FILE_STORAGE", "S3_", "STREAM_"),
)
CONNECT_TIMEOUT = 20.0
HTTP_TIMEOUT = 30.0
INSTANCES = ("a", "b")

CSV_COLUMNS = (
    "elapsed_s",
    "time_utc",
    "phase",
    "rss_mib_a",
    "fds_a",
    "threads_a",
    "cpu_pct_a",
    "rss_mib_b",
    "fds_b",
    "threads_b",
    "cpu_pct_b",
    "pg_connections",
    "redis_clients",
    "redis_used_mib",
    "redis_keys",
    "machine_cpu_pct",
    "cpu_pct_generator",
    "ws_open_a",
    "ws_open_b",
    "acked",
    "deliveries",
    "answers",
    "uploads",
    "reconnects",
    "failures",
    "latency_p50_ms",
    "latency_p99_ms",
)
# The resources judged "flat after warm-up": (CSV column, label, unit, absolute tolerance).
FLAT_METRICS = (
    ("rss_mib_a", "RSS instance a", "MiB", 8.0),
    ("rss_mib_b", "RSS instance b", "MiB", 8.0),
    ("fds_a", "open FDs instance a", "", 5.0),
    ("fds_b", "open FDs instance b", "", 5.0),
    ("pg_connections", "PostgreSQL connections", "", 3.0),
    ("redis_clients", "Redis connected_clients", "", 3.0),
)
FLAT_RELATIVE = 0.05  # |last - first| within max(5 % of first, the absolute tolerance)


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def log_problems(server: Server) -> tuple[Counter[str], Counter[str]]:
    """Levels of the JSON log lines, and WARNING+ lines grouped by their first words."""
    levels: Counter[str] = Counter()
    grouped: Counter[str] = Counter()
    for line in server.log_lines():
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            if line.strip() and not line.startswith(("chat-service ", "  ")):
                levels["non-JSON"] += 1
                grouped[f"non-JSON: {line.strip()[:120]}"] += 1
            continue
        if not isinstance(record, dict):
            continue
        level = str(record.get("level", "?"))
        levels[level] += 1
        if level in ("WARNING", "ERROR", "CRITICAL"):
            exc = str(record.get("exception") or "").strip().splitlines()
            text = f"{level} {record.get('logger', '')}: {str(record.get('message', ''))[:120]}"
            if exc:
                text += f" | {exc[-1][:160]}"
            grouped[text] += 1
    return levels, grouped


# ---------------------------------------------------------------------------------------
# rooms, devices and the checks on what each device receives
# ---------------------------------------------------------------------------------------


@dataclass
class Room:
    index: int
    session_id: str
    kind: str  # "group" | "agent"
    users: list[str]
    devices: list[Device] = field(default_factory=list)
    acked: set[int] = field(default_factory=set)  # seqs acknowledged to a sender
    max_seq: int = 0  # highest seq known to exist
    final_seq: int = 0  # the last seq in the stored history at the end


@dataclass
class PendingSend:
    sent_at: float
    question: bool


class Device:
    """One WebSocket "device" of a user in a room; survives its reconnects."""

    def __init__(self, room: Room, user: str, token: str, instance: int, name: str) -> None:
        self.room = room
        self.user = user
        self.token = token
        self.instance = instance
        self.name = name
        self.ws: Any = None
        self.state = "closed"  # closed | connecting | open | closing
        self.reader: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()
        self.refused: str | None = None  # closed before its `connected` frame
        self.connected_at = 0.0  # wall clock of the current connection's `connected`
        self.start_seq: int | None = None  # deliveries are expected after this seq
        # Every seq it got, across reconnects: replays after one must not count twice.
        self.tally = Tally(remember=True)
        self.connects = 0
        self.unexpected: list[str] = []
        self.pending: dict[str, PendingSend] = {}  # client_msg_id -> WS send awaiting echo
        self.streams: dict[str, int] = {}  # current connection: stream id -> next chunk index

    @property
    def last_seq(self) -> int:
        return self.tally.last_seq


@dataclass
class Answer:
    room: Room
    reply_to: str
    started: float
    ended: float | None = None
    status: str | None = None
    seq: int | None = None


class Stats:
    def __init__(self) -> None:
        self.count: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()  # error frames by code
        self.anomalies: Counter[str] = Counter()
        self.examples: list[str] = []  # the first anomalies, verbatim
        self.latencies: list[float] = []  # ms, since the last sample
        self.all_latencies: array.array[float] = array.array("d")
        self.ack_latencies: array.array[float] = array.array("d")  # WS send -> own echo, ms
        self.answer_latencies: list[float] = []  # question acked -> stream_end, s
        self.questions: dict[str, tuple[Room, float]] = {}  # message id -> (room, ack time)
        self.answers: dict[str, Answer] = {}

    def anomaly(self, kind: str, detail: str) -> None:
        self.anomalies[kind] += 1
        if len(self.examples) < 30:
            self.examples.append(f"{kind}: {detail}")

    def failure(self, what: str) -> None:
        self.failures[what[:200]] += 1
        self.count["failures"] += 1


# ---------------------------------------------------------------------------------------
# the soak itself
# ---------------------------------------------------------------------------------------


class Soak:
    def __init__(self, args: argparse.Namespace, stack: Stack, csv_handle: TextIO) -> None:
        assert stack.database is not None and stack.redis is not None
        self.args = args
        self.servers = stack.servers
        self.redis = stack.redis
        self.db_name = stack.database
        self.csv = csv.writer(csv_handle)
        self.csv_handle = csv_handle
        self.rng = random.Random(args.seed)
        self.ttl = int(args.duration + args.drain_timeout + 7200)
        self.stats = Stats()
        self.rooms: list[Room] = []
        self.group_rooms: list[Room] = []
        self.agent_rooms: list[Room] = []
        self.devices: list[Device] = []
        self.http: list[httpx.AsyncClient] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.stop_traffic = asyncio.Event()
        self.draining = False
        self.t0 = 0.0
        self.samples: list[dict[str, Any]] = []
        self.run_tag = uuid.uuid4().hex[:6]
        self._cpu_prev: dict[int, float] = {}
        self._machine_prev = machine_cpu()
        self._sample_prev = time.monotonic()

    # -- helpers ---------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def auth(self, user: str) -> dict[str, str]:
        return bearer(self.token(user))

    def token(self, user: str) -> str:
        return token(user, ttl_seconds=self.ttl)

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(self._guard(coro, name), name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _guard(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.stats.failure(f"{name}: {type(exc).__name__}: {exc}")

    def text(self, words: int) -> str:
        vocab = ("soak", "chat", "steady", "hello", "agent", "upload", "seq", "room", "redis")
        return " ".join(self.rng.choice(vocab) for _ in range(words))

    # -- setup -----------------------------------------------------------------------------

    async def create_rooms(self) -> None:
        args = self.args
        for r in range(args.rooms):
            users = [f"g{r}m{i}-{self.run_tag}" for i in range(args.members)]
            session_id = await create_session(
                self.http[r % 2],
                self.token(users[0]),
                title=f"soak room {r}",
                participants=users[1:],
            )
            room = Room(r, session_id, "group", users)
            for i, user in enumerate(users):
                device = Device(room, user, self.token(user), (r + i) % 2, f"room{r}/{user}")
                room.devices.append(device)
            self.group_rooms.append(room)
        for a in range(args.agent_sessions):
            user = f"agent-user{a}-{self.run_tag}"
            session_id = await create_session(
                self.http[a % 2], self.token(user), title=f"soak agent {a}", agent_id=1
            )
            room = Room(args.rooms + a, session_id, "agent", [user])
            user_token = self.token(user)
            for d in range(args.agent_devices):
                room.devices.append(Device(room, user, user_token, d % 2, f"agent{a}/dev{d}"))
            self.agent_rooms.append(room)
        self.rooms = self.group_rooms + self.agent_rooms
        self.devices = [d for room in self.rooms for d in room.devices]

    # -- WebSocket devices -----------------------------------------------------------------

    async def connect(self, dev: Device, since: int | None) -> None:
        dev.state = "connecting"
        dev.ready = asyncio.Event()
        dev.refused = None
        url = f"{self.servers[dev.instance].ws_url}/ws/{dev.room.session_id}?token={dev.token}"
        if since is not None:
            url += f"&since_seq={since}"
        try:
            ws = await websockets.connect(
                url,
                open_timeout=CONNECT_TIMEOUT,
                ping_interval=None,
                close_timeout=5,
                max_size=2**22,
            )
        except Exception:
            dev.state = "closed"
            raise
        dev.ws = ws
        dev.streams = {}
        dev.connects += 1
        dev.reader = asyncio.create_task(self.read_loop(dev, ws), name=f"read {dev.name}")
        try:
            await asyncio.wait_for(dev.ready.wait(), CONNECT_TIMEOUT)
        except TimeoutError:
            dev.state = "closing"
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 5)
            dev.state = "closed"
            raise RuntimeError(f"{dev.name}: no `connected` frame") from None
        if dev.refused is not None:
            dev.state = "closed"
            raise RuntimeError(f"{dev.name}: {dev.refused}")
        dev.state = "open"

    async def connect_retry(self, dev: Device, since: int | None, attempts: int = 6) -> None:
        """Connect, retrying with backoff (a client would); the last failure is raised."""
        for attempt in range(attempts):
            try:
                await self.connect(dev, since)
                return
            except Exception as exc:
                self.stats.count["connect_retries"] += 1
                if attempt == attempts - 1:
                    raise
                self.stats.anomaly("connect failed", f"{dev.name}: {type(exc).__name__}: {exc}")
                await asyncio.sleep(0.5 * 2**attempt)
                dev.instance = self.rng.randrange(2)

    async def read_loop(self, dev: Device, ws: Any) -> None:
        reason = "connection lost"
        try:
            async for raw in ws:
                self.on_frame(dev, raw)
            reason = f"closed {ws.close_code} {ws.close_reason}"
        except ConnectionClosed as exc:
            rcvd = exc.rcvd
            reason = f"closed {rcvd.code} {rcvd.reason}" if rcvd else "connection lost"
        except Exception as exc:
            reason = f"reader failed: {type(exc).__name__}: {exc}"
            self.stats.failure(f"reader {dev.name}: {reason}")
        finally:
            if dev.ws is ws:
                dev.ws = None
                if dev.state == "connecting":  # refused: connect() reports it
                    dev.refused = reason
                    dev.ready.set()
                elif dev.state != "closing":
                    dev.unexpected.append(reason)
                    self.stats.count["unexpected_closes"] += 1
                    self.stats.anomaly("server closed a connection", f"{dev.name}: {reason}")
                    dev.state = "closed"
                    self.spawn(self.repair(dev), "repair")
                else:
                    dev.state = "closed"

    async def repair(self, dev: Device) -> None:
        """A connection the server closed: reconnect with since_seq, as a client would."""
        await asyncio.sleep(0.5)
        if dev.state == "closed":
            await self.connect_retry(dev, dev.last_seq)

    def on_seq(self, dev: Device, seq: int, what: str) -> None:
        room = dev.room
        if seq > room.max_seq:
            room.max_seq = seq
        last = dev.last_seq
        problem = dev.tally.see(seq)
        if problem == "duplicate":
            self.stats.anomaly("duplicate", f"{dev.name}: seq {seq} again ({what})")
            return
        if problem == "out of order":
            self.stats.anomaly("out of order", f"{dev.name}: seq {seq} after {last}")
        elif problem == "gap":
            self.stats.anomaly("gap", f"{dev.name}: seq {seq} after {last} ({what})")
        self.stats.count["deliveries"] += 1

    def on_frame(self, dev: Device, raw: str | bytes) -> None:
        now = time.time()
        frame = orjson.loads(raw)
        kind = frame.get("type")
        stats = self.stats
        stats.count["frames"] += 1
        if kind == "message":
            seq = int(frame["seq"])
            self.on_seq(dev, seq, "message")
            cid = frame.get("client_msg_id")
            if cid and frame.get("sender_id") == dev.user:
                pending = dev.pending.pop(cid, None)
                if pending is not None:
                    dev.room.acked.add(seq)
                    stats.ack_latencies.append((now - pending.sent_at) * 1000)
                    if pending.question:
                        stats.count["questions_acked"] += 1
                        stats.questions[frame["message_id"]] = (dev.room, now)
                    else:
                        stats.count["ws_acked"] += 1
            meta = frame.get("metadata") or {}
            if frame.get("sender_type") == "agent" and isinstance(meta, dict):
                self.answer_ended(
                    dev.room,
                    frame["message_id"],
                    str(meta.get("reply_to", "")),
                    str(meta.get("status")),
                    seq,
                    now,
                )
            sent = meta.get("t") if isinstance(meta, dict) else None
            if isinstance(sent, int) and sent / 1e6 >= dev.connected_at:
                latency = now * 1000 - sent / 1000
                stats.latencies.append(latency)
                stats.all_latencies.append(latency)
        elif kind == "stream_start":
            mid = frame["message_id"]
            if mid in dev.streams:
                stats.anomaly("stream_start twice", f"{dev.name}: {mid}")
            dev.streams[mid] = 0
            if mid not in stats.answers:
                stats.answers[mid] = Answer(dev.room, str(frame.get("reply_to", "")), now)
        elif kind == "stream_chunk":
            mid = frame["message_id"]
            expected = dev.streams.get(mid)
            if expected is None:
                stats.anomaly("chunk without stream_start", f"{dev.name}: {mid}")
            elif frame.get("index") != expected:
                stats.anomaly(
                    "chunk index", f"{dev.name}: {mid} got {frame.get('index')}, want {expected}"
                )
                dev.streams[mid] = int(frame.get("index", expected)) + 1
            else:
                dev.streams[mid] = expected + 1
        elif kind == "stream_end":
            mid = frame["message_id"]
            status = str(frame.get("status"))
            seq = frame.get("seq")
            got = dev.streams.pop(mid, None)
            if got is None:
                stats.count["stream_end_without_start"] += 1  # joined after the answer ended
            else:
                stats.count["stream_ends_seen"] += 1
                if frame.get("chunks") != got:
                    stats.anomaly(
                        "stream chunk count",
                        f"{dev.name}: {mid} saw {got} chunks, stream_end says "
                        f"{frame.get('chunks')}",
                    )
            if status != "completed":
                stats.anomaly("answer not completed", f"{dev.name}: {mid} status {status}")
            self.answer_ended(dev.room, mid, "", status, seq, now)
            if isinstance(seq, int):
                self.on_seq(dev, seq, "stream_end")
            else:
                stats.anomaly("stream_end without seq", f"{dev.name}: {mid} status {status}")
        elif kind == "connected":
            dev.connected_at = now
            if dev.start_seq is None:
                dev.start_seq = dev.tally.last_seq = int(frame["last_seq"])
            elif int(frame["since_seq"]) != min(dev.last_seq, int(frame["last_seq"])):
                stats.anomaly(
                    "connected.since_seq", f"{dev.name}: {frame['since_seq']} vs {dev.last_seq}"
                )
            dev.ready.set()
        elif kind == "error":
            code = str(frame.get("code"))
            stats.errors[code] += 1
            cid = frame.get("client_msg_id")
            if cid and dev.pending.pop(cid, None) is not None:
                stats.count["ws_refused"] += 1
        else:
            stats.count[f"frames_{kind}"] += 1

    def answer_ended(
        self, room: Room, mid: str, reply_to: str, status: str, seq: Any, now: float
    ) -> None:
        """The first sight of an answer's end (stream_end, or the stored answer replayed)."""
        stats = self.stats
        answer = stats.answers.get(mid)
        if answer is None:
            answer = stats.answers[mid] = Answer(room, reply_to, now)
        if answer.ended is not None:
            return
        answer.ended, answer.status, answer.seq = now, status, seq
        answer.reply_to = answer.reply_to or reply_to
        stats.count["answers_completed" if status == "completed" else "answers_other"] += 1
        question = stats.questions.get(answer.reply_to)
        if question is not None:
            stats.answer_latencies.append(now - question[1])

    # -- traffic ---------------------------------------------------------------------------

    async def paced(self, name: str, rate: float, action: Any) -> None:
        """Calls action(k) as its own task `rate` times a second, on a fixed schedule."""
        if rate <= 0:
            return
        period = 1.0 / rate
        start = time.monotonic() + self.rng.random() * period
        k = 0
        while not self.stop_traffic.is_set():
            due = start + k * period
            delay = due - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop_traffic.wait(), delay)
                if self.stop_traffic.is_set():
                    return
            elif delay < -5 * period - 1:  # far behind (a stalled loop): do not burst
                self.stats.count[f"{name}_behind"] += 1
                start, k = time.monotonic(), 0
            k += 1
            if len(self.tasks) >= self.args.max_inflight:
                self.stats.count[f"{name}_skipped"] += 1
                continue
            self.spawn(action(k), name)

    def open_device(self, room: Room) -> Device | None:
        devices = [d for d in room.devices if d.state == "open"]
        return self.rng.choice(devices) if devices else None

    async def ws_send(self, k: int, room: Room | None = None, question: bool = False) -> None:
        room = room or self.rng.choice(self.group_rooms)
        dev = self.open_device(room)
        if dev is None or dev.ws is None:
            self.stats.count["ws_send_no_open_device"] += 1
            return
        cid = f"{'q' if question else 'w'}{k}-{uuid.uuid4().hex[:10]}"
        words = self.rng.randint(3, 30)
        frame = {
            "type": "message",
            "content": f"question {k}: {self.text(words)}?" if question else self.text(words),
            "client_msg_id": cid,
            "metadata": {"t": time.time_ns() // 1000},
        }
        dev.pending[cid] = PendingSend(time.time(), question)
        try:
            await dev.ws.send(orjson.dumps(frame).decode())
        except (ConnectionClosed, AttributeError):
            dev.pending.pop(cid, None)  # never left: not a send
            self.stats.count["ws_send_closed"] += 1
            return
        self.stats.count["questions_sent" if question else "ws_sent"] += 1

    async def rest_send(self, k: int, room: Room | None = None, question: bool = False) -> None:
        room = room or self.rng.choice(self.group_rooms)
        user = self.rng.choice(room.users)
        words = self.rng.randint(3, 30)
        body = {
            "content": f"question {k}: {self.text(words)}?" if question else self.text(words),
            "client_msg_id": f"{'Q' if question else 'r'}{k}-{uuid.uuid4().hex[:10]}",
            "metadata": {"t": time.time_ns() // 1000},
        }
        self.stats.count["questions_sent" if question else "rest_sent"] += 1
        resp = await self.http[self.rng.randrange(2)].post(
            f"/api/chat/sessions/{room.session_id}/messages", json=body, headers=self.auth(user)
        )
        if resp.status_code != 201:
            self.stats.failure(f"REST send {resp.status_code}: {resp.text[:120]}")
            return
        answer = resp.json()
        room.acked.add(int(answer["seq"]))
        room.max_seq = max(room.max_seq, int(answer["seq"]))
        if question:
            self.stats.count["questions_acked"] += 1
            self.stats.questions[answer["message_id"]] = (room, time.time())
        else:
            self.stats.count["rest_acked"] += 1

    async def ask(self, k: int) -> None:
        room = self.rng.choice(self.agent_rooms)
        if k % 2:
            await self.ws_send(k, room, question=True)
        else:
            await self.rest_send(k, room, question=True)

    def png(self, k: int) -> bytes:
        width, height = self.rng.randint(40, 200), self.rng.randint(40, 200)
        image = Image.new("RGB", (width, height), (k * 37 % 256, k * 91 % 256, k * 13 % 256))
        for _ in range(50):
            image.putpixel(
                (self.rng.randrange(width), self.rng.randrange(height)),
                (self.rng.randrange(256), self.rng.randrange(256), self.rng.randrange(256)),
            )
        out = io.BytesIO()
        image.save(out, format="PNG")
        return out.getvalue()

    async def upload(self, k: int) -> None:
        room = self.rng.choice(self.group_rooms)
        user = self.rng.choice(room.users)
        if k % 2:
            name, mime, data = f"pic-{k}.png", "image/png", self.png(k)
        else:
            text = f"soak upload {k}\n" + "\n".join(self.text(12) for _ in range(20)) + "\n"
            name, mime, data = f"notes-{k}.txt", "text/plain", text.encode()
        instance = self.rng.randrange(2)
        self.stats.count["uploads_sent"] += 1
        resp = await self.http[instance].post(
            f"/api/chat/sessions/{room.session_id}/files",
            files={"file": (name, data, mime)},
            data={"client_msg_id": f"f{k}-{uuid.uuid4().hex[:10]}"},
            headers=self.auth(user),
        )
        if resp.status_code != 201:
            self.stats.failure(f"upload {resp.status_code}: {resp.text[:120]}")
            return
        body = resp.json()
        seq = int(body["seq"])
        room.acked.add(seq)
        room.max_seq = max(room.max_seq, seq)
        self.stats.count["uploads_ok"] += 1
        other = self.http[1 - instance]
        reader = self.rng.choice(room.users)
        got = await other.get(body["file_url"], headers=self.auth(reader))
        if (
            got.status_code != 200
            or hashlib.sha256(got.content).digest() != hashlib.sha256(data).digest()
        ):
            self.stats.failure(f"download {body['file_url']}: {got.status_code}, bytes differ")
            return
        if mime == "image/png":
            thumb_url = body.get("thumbnail_url")
            if not thumb_url:
                self.stats.failure(f"upload {body['file_id']}: PNG without thumbnail_url")
                return
            thumb = await other.get(thumb_url, headers=self.auth(reader))
            if thumb.status_code != 200 or not thumb.content:
                self.stats.failure(f"thumbnail {thumb_url}: {thumb.status_code}")
                return
        self.stats.count["downloads_ok"] += 1

    async def bounce(self, k: int) -> None:
        """Drop a random open device's WebSocket, wait, reconnect with since_seq."""
        candidates = [d for d in self.devices if d.state == "open"]
        if not candidates:
            return
        dev = self.rng.choice(candidates)
        dev.state = "closing"
        ws, reader = dev.ws, dev.reader
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(), 10)
        if reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(reader, 10)
        dev.state = "closed"
        await asyncio.sleep(self.rng.uniform(0, self.args.reconnect_gap))
        dev.instance = self.rng.randrange(2)
        await self.connect_retry(dev, dev.last_seq)
        self.stats.count["reconnects"] += 1

    # -- sampling --------------------------------------------------------------------------

    async def sample(self, phase: str, pg: Any, rds: Any) -> dict[str, Any]:
        now = time.monotonic()
        interval = now - self._sample_prev
        self._sample_prev = now
        rates = interval >= 1.0  # CPU shares over a shorter interval would be noise
        row: dict[str, Any] = {
            "elapsed_s": round(self.elapsed(), 1),
            "time_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "phase": phase,
        }
        for name, server in zip(INSTANCES, self.servers, strict=True):
            status = proc_status(server.pid)
            cpu = cpu_seconds(server.pid)
            row[f"rss_mib_{name}"] = round(status.get("VmRSS", 0) / 1024, 1)
            row[f"fds_{name}"] = open_fds(server.pid)
            row[f"threads_{name}"] = status.get("Threads", 0)
            row[f"cpu_pct_{name}"] = (
                round(100 * (cpu - self._cpu_prev.get(server.pid, cpu)) / interval, 1)
                if rates
                else ""
            )
            self._cpu_prev[server.pid] = cpu
            row[f"ws_open_{name}"] = sum(
                1 for d in self.devices if d.state == "open" and d.instance == INSTANCES.index(name)
            )
        try:
            row["pg_connections"] = await pg.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1", self.db_name, timeout=10
            )
        except Exception as exc:
            row["pg_connections"] = -1
            self.stats.failure(f"sampling PostgreSQL: {type(exc).__name__}: {exc}")
        try:
            clients = await asyncio.wait_for(rds.info("clients"), 10)
            memory = await asyncio.wait_for(rds.info("memory"), 10)
            row["redis_clients"] = int(clients["connected_clients"])
            row["redis_used_mib"] = round(int(memory["used_memory"]) / 2**20, 2)
            row["redis_keys"] = int(await asyncio.wait_for(rds.dbsize(), 10))
        except Exception as exc:
            row["redis_clients"] = row["redis_used_mib"] = row["redis_keys"] = -1
            self.stats.failure(f"sampling Redis: {type(exc).__name__}: {exc}")
        busy, total = machine_cpu()
        prev_busy, prev_total = self._machine_prev
        self._machine_prev = (busy, total)
        row["machine_cpu_pct"] = (
            round(100 * (busy - prev_busy) / max(total - prev_total, 1e-6), 1) if rates else ""
        )
        own = cpu_seconds(os.getpid())
        row["cpu_pct_generator"] = (
            round(100 * (own - self._cpu_prev.get(os.getpid(), own)) / interval, 1) if rates else ""
        )
        self._cpu_prev[os.getpid()] = own
        c = self.stats.count
        row["acked"] = c["ws_acked"] + c["rest_acked"] + c["uploads_ok"] + c["questions_acked"]
        row["deliveries"] = c["deliveries"]
        row["answers"] = c["answers_completed"]
        row["uploads"] = c["uploads_ok"]
        row["reconnects"] = c["reconnects"]
        row["failures"] = c["failures"] + sum(self.stats.anomalies.values())
        window, self.stats.latencies = self.stats.latencies, []
        row["latency_p50_ms"] = round(percentile(window, 0.5), 1) if window else ""
        row["latency_p99_ms"] = round(percentile(window, 0.99), 1) if window else ""
        self.samples.append(row)
        self.csv.writerow([row.get(col, "") for col in CSV_COLUMNS])
        self.csv_handle.flush()
        return row

    async def sampler(self, pg: Any, rds: Any) -> None:
        interval = self.args.sample_interval
        k = 0
        while not self.stop_traffic.is_set():
            k += 1
            delay = self.t0 + k * interval - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop_traffic.wait(), delay)
            if self.stop_traffic.is_set():
                return
            row = await self.sample("run", pg, rds)
            if k % max(1, int(60 / interval)) == 0:
                print(
                    f"[{row['elapsed_s']:7.0f} s] rss {row['rss_mib_a']}/{row['rss_mib_b']} MiB, "
                    f"fds {row['fds_a']}/{row['fds_b']}, pg {row['pg_connections']}, redis "
                    f"{row['redis_clients']}, ws {row['ws_open_a']}/{row['ws_open_b']}, acked "
                    f"{row['acked']}, deliveries {row['deliveries']}, answers {row['answers']}, "
                    f"uploads {row['uploads']}, reconnects {row['reconnects']}, p99 "
                    f"{row['latency_p99_ms']} ms, failures {row['failures']}, machine "
                    f"{row['machine_cpu_pct']} %",
                    flush=True,
                )

    # -- the run ---------------------------------------------------------------------------

    async def run(self) -> None:
        args = self.args
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
        self.http = [
            httpx.AsyncClient(base_url=s.base_url, timeout=HTTP_TIMEOUT, limits=limits)
            for s in self.servers
        ]
        pg = await asyncpg.connect(SOAK_ADMIN_URL, timeout=10)
        rds = aioredis.Redis(host=HOST, port=self.redis.port, socket_timeout=10)
        try:
            await self.create_rooms()
            for start in range(0, len(self.devices), 20):
                batch = self.devices[start : start + 20]
                await asyncio.gather(*(self.connect(d, None) for d in batch))
            print(
                f"{len(self.group_rooms)} group rooms x {args.members} members, "
                f"{len(self.agent_rooms)} agent sessions x {args.agent_devices} devices: "
                f"{len(self.devices)} WebSockets open "
                f"({sum(1 for d in self.devices if d.instance == 0)} on a, "
                f"{sum(1 for d in self.devices if d.instance == 1)} on b)",
                flush=True,
            )
            self.t0 = time.monotonic()
            self._sample_prev = self.t0
            for pid in (*(s.pid for s in self.servers), os.getpid()):
                self._cpu_prev[pid] = cpu_seconds(pid)
            await self.sample("run", pg, rds)
            drivers = [
                asyncio.create_task(self.sampler(pg, rds)),
                asyncio.create_task(self.paced("ws_send", args.ws_rate, self.ws_send)),
                asyncio.create_task(self.paced("rest_send", args.rest_rate, self.rest_send)),
                asyncio.create_task(self.paced("ask", 1 / args.agent_interval, self.ask)),
                asyncio.create_task(self.paced("upload", 1 / args.upload_interval, self.upload)),
                asyncio.create_task(
                    self.paced("reconnect", 1 / args.reconnect_interval, self.bounce)
                ),
            ]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_traffic.wait(), args.duration)
            self.stop_traffic.set()
            await asyncio.gather(*drivers)
            await self.sample("end", pg, rds)
            print(f"traffic stopped at {self.elapsed():.0f} s; draining", flush=True)
            await self.drain()
            await self.sample("drained", pg, rds)
            await self.check_history()
        finally:
            self.stop_traffic.set()
            self.draining = True
            for dev in self.devices:
                if dev.ws is not None:
                    dev.state = "closing"
            await asyncio.gather(
                *(asyncio.wait_for(d.ws.close(), 5) for d in self.devices if d.ws is not None),
                return_exceptions=True,
            )
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            for client in self.http:
                await client.aclose()
            await pg.close(timeout=5)
            await rds.aclose()

    async def drain(self) -> None:
        """Let in-flight work finish, reconnect every device, wait until all caught up."""
        deadline = time.monotonic() + self.args.drain_timeout
        self.draining = True
        while self.tasks and time.monotonic() < deadline:
            await asyncio.wait(set(self.tasks), timeout=max(0.1, deadline - time.monotonic()))
        for dev in self.devices:
            if dev.state == "closed":
                self.spawn(self.connect_retry(dev, dev.last_seq), "drain reconnect")
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            if self.tasks:
                continue
            waiting_answers = self.stats.count["questions_acked"] - (
                self.stats.count["answers_completed"] + self.stats.count["answers_other"]
            )
            behind = [d for d in self.devices if d.last_seq < d.room.max_seq or d.state != "open"]
            pending = sum(len(d.pending) for d in self.devices)
            if waiting_answers <= 0 and not behind and not pending:
                break
        await asyncio.sleep(2)  # anything still on its way (an answer's last frames)
        self.stats.count["streams_unended"] = sum(
            len(d.streams) for d in self.devices if d.state == "open"
        )
        self.stats.count["devices_not_open_after_drain"] = sum(
            1 for d in self.devices if d.state != "open"
        )

    async def check_history(self) -> None:
        """Over REST: each room's history is gap-free and holds what was acknowledged."""
        stats = self.stats
        for room in self.rooms:
            client = self.http[room.index % 2]
            headers = self.auth(room.users[0])
            messages: list[dict[str, Any]] = []
            cursor = 0
            while True:
                resp = await client.get(
                    f"/api/chat/sessions/{room.session_id}/messages",
                    params={"limit": 200, "after": cursor},
                    headers=headers,
                )
                resp.raise_for_status()
                body = resp.json()
                messages.extend(body["messages"])
                if not body["has_more"] or not body["messages"]:
                    break
                cursor = body["messages"][-1]["seq"]
            seqs = [int(m["seq"]) for m in messages]
            room.final_seq = seqs[-1] if seqs else 0
            stats.count["stored_messages"] += len(seqs)
            if seqs != list(range(1, len(seqs) + 1)):
                stats.anomaly("history not 1..n", f"{room.session_id}: {len(seqs)} messages")
            missing = room.acked - set(seqs)
            if missing:
                stats.anomaly("acked but not stored", f"{room.session_id}: {sorted(missing)[:5]}")
            if room.kind == "agent":
                questions = [m for m in messages if m["sender_type"] == "user"]
                answers = [m for m in messages if m["sender_type"] == "agent"]
                stats.count["stored_questions"] += len(questions)
                stats.count["stored_answers"] += len(answers)
                replies = Counter(str((m.get("metadata") or {}).get("reply_to")) for m in answers)
                for question in questions:
                    n = replies.get(question["message_id"], 0)
                    if n != 1:
                        stats.anomaly(
                            "question without exactly one stored answer",
                            f"{room.session_id} {question['message_id']}: {n}",
                        )
                for answer in answers:
                    status = (answer.get("metadata") or {}).get("status")
                    stats.count[f"stored_answers_{status}"] += 1


# ---------------------------------------------------------------------------------------
# analysis, plot, report
# ---------------------------------------------------------------------------------------


def windows(args: argparse.Namespace) -> tuple[float, float]:
    """Warm-up and comparison window, scaled down for runs too short for the defaults."""
    if args.warmup + 2 * args.window <= args.duration:
        return float(args.warmup), float(args.window)
    return args.duration * 300 / 3600, args.duration * 600 / 3600


def flatness(
    samples: list[dict[str, Any]], column: str, duration: float, warmup: float, window: float
) -> dict[str, float]:
    points = [
        (float(s["elapsed_s"]), float(s[column]))
        for s in samples
        if s["phase"] == "run" and s.get(column) not in ("", None) and float(s[column]) >= 0
    ]
    first = [v for t, v in points if warmup <= t < warmup + window]
    last = [v for t, v in points if t >= duration - window]
    after = [(t, v) for t, v in points if t >= warmup]
    slope = math.nan
    if len(after) >= 2:
        mean_t = statistics.fmean(t for t, _ in after)
        mean_v = statistics.fmean(v for _, v in after)
        var = sum((t - mean_t) ** 2 for t, _ in after)
        if var > 0:
            slope = sum((t - mean_t) * (v - mean_v) for t, v in after) / var * 3600
    return {
        "start": points[0][1] if points else math.nan,
        "end": points[-1][1] if points else math.nan,
        "min": min((v for _, v in points), default=math.nan),
        "max": max((v for _, v in points), default=math.nan),
        "first_mean": statistics.fmean(first) if first else math.nan,
        "last_mean": statistics.fmean(last) if last else math.nan,
        "slope_per_hour": slope,
    }


def plot(
    samples: list[dict[str, Any]],
    path: Path,
    title: str,
    warmup: float,
    window: float,
    duration: float,
) -> None:
    """One panel per metric over time (matplotlib imported here, only when plotting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = [s for s in samples if s["phase"] == "run"]
    minutes = [float(s["elapsed_s"]) / 60 for s in run]

    def series(column: str) -> list[float]:
        return [float(s[column]) if s[column] not in ("", None) else math.nan for s in run]

    panels: list[tuple[str, list[tuple[str, str]]]] = [
        ("RSS (MiB; axis not from 0)", [("rss_mib_a", "instance a"), ("rss_mib_b", "instance b")]),
        ("open file descriptors", [("fds_a", "instance a"), ("fds_b", "instance b")]),
        ("PostgreSQL connections (soak db)", [("pg_connections", "pg_stat_activity")]),
        ("Redis connected_clients", [("redis_clients", "INFO clients (incl. sampler)")]),
        ("Redis used_memory (MiB)", [("redis_used_mib", "INFO memory")]),
        ("delivery latency (ms)", [("latency_p50_ms", "p50"), ("latency_p99_ms", "p99")]),
        (
            "CPU (% of one core)",
            [
                ("cpu_pct_a", "instance a"),
                ("cpu_pct_b", "instance b"),
                ("cpu_pct_generator", "load generator"),
                ("machine_cpu_pct", "whole machine (% of 2 cores)"),
            ],
        ),
    ]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.3 * len(panels)), sharex=True)
    for ax, (label, lines) in zip(axes, panels, strict=True):
        for column, name in lines:
            ax.plot(minutes, series(column), label=name, linewidth=1.2)
        ax.axvspan(0, warmup / 60, color="grey", alpha=0.15)
        ax.axvspan(warmup / 60, (warmup + window) / 60, color="tab:green", alpha=0.08)
        ax.axvspan((duration - window) / 60, duration / 60, color="tab:red", alpha=0.08)
        ax.set_ylabel(label, fontsize=8)
        if "not from 0" not in label:
            ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left", ncol=len(lines))
    axes[-1].set_xlabel("minutes (grey: warm-up; green: first window after it; red: last window)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def flat_lines(
    flat: dict[str, dict[str, float]], warmup: float, window: float
) -> tuple[list[str], dict[str, bool]]:
    """The "flat after warm-up" verdict of each resource, as report lines."""
    lines = [
        f"flat after warm-up (first {window:.0f} s after a {warmup:.0f} s warm-up vs the "
        f"last {window:.0f} s; slope: least squares after warm-up):"
    ]
    verdicts: dict[str, bool] = {}
    for column, label, unit, tolerance in FLAT_METRICS:
        f = flat[column]
        delta = f["last_mean"] - f["first_mean"]
        ok = abs(delta) <= max(FLAT_RELATIVE * abs(f["first_mean"]), tolerance)
        verdicts[column] = ok
        lines.append(
            f"  {label}: start {f['start']:.1f} -> end {f['end']:.1f} {unit} (min "
            f"{f['min']:.1f}, max {f['max']:.1f}); first window {f['first_mean']:.1f}, last "
            f"window {f['last_mean']:.1f} ({delta:+.1f}); slope {f['slope_per_hour']:+.2f}/h "
            f"-> {'flat' if ok else 'NOT FLAT'}"
        )
    for column in ("redis_used_mib", "redis_keys"):
        f = flat[column]
        lines.append(
            f"  ({column}: {f['start']:.2f} -> {f['end']:.2f}, first window "
            f"{f['first_mean']:.2f}, last {f['last_mean']:.2f}, slope "
            f"{f['slope_per_hour']:+.2f}/h)"
        )
    return lines, verdicts


def all_flatness(
    samples: list[dict[str, Any]], duration: float, warmup: float, window: float
) -> dict[str, dict[str, float]]:
    columns = [column for column, *_ in FLAT_METRICS] + ["redis_used_mib", "redis_keys"]
    return {c: flatness(samples, c, duration, warmup, window) for c in columns}


def delivery_report(soak: Soak) -> dict[str, Any]:
    """What every device should have got (seqs after it first connected) against what it got."""
    expected = received = lost = missing_other = 0
    acked_expected = 0
    worst: list[str] = []
    for room in soak.rooms:
        target = max(room.final_seq, room.max_seq)
        for dev in room.devices:
            start = dev.start_seq or 0
            for seq in range(start + 1, target + 1):
                expected += 1
                acked = seq in room.acked
                acked_expected += acked
                if dev.tally.has(seq):
                    received += 1
                elif acked:
                    lost += 1
                    if len(worst) < 10:
                        worst.append(f"{dev.name} missed acked seq {seq}")
                else:
                    missing_other += 1
                    if len(worst) < 10:
                        worst.append(f"{dev.name} missed seq {seq} (not acked)")
    devices = soak.devices
    return {
        "deliveries_expected": expected,
        "deliveries_received": received,
        "acked_deliveries_expected": acked_expected,
        "lost_acked": lost,
        "missing_other": missing_other,
        "duplicates": sum(d.tally.duplicates for d in devices),
        "gaps": sum(d.tally.gaps for d in devices),
        "out_of_order": sum(d.tally.backwards for d in devices),
        "examples": worst,
    }


def report(
    soak: Soak, args: argparse.Namespace, logs: dict[str, tuple[Counter[str], Counter[str]]]
) -> tuple[dict[str, Any], list[str]]:
    c = soak.stats.count
    warmup, window = windows(args)
    delivery = delivery_report(soak)
    flat = all_flatness(soak.samples, args.duration, warmup, window)
    lines: list[str] = []
    sent = c["ws_sent"] + c["rest_sent"] + c["questions_sent"] + c["uploads_sent"]
    acked = c["ws_acked"] + c["rest_acked"] + c["questions_acked"] + c["uploads_ok"]
    lines.append(
        f"messages sent: {sent} (WebSocket {c['ws_sent']}, REST {c['rest_sent']}, agent "
        f"questions {c['questions_sent']}, uploads {c['uploads_sent']}); acknowledged {acked} "
        f"(WebSocket echo {c['ws_acked']}, REST 201 {c['rest_acked']}, questions "
        f"{c['questions_acked']}, uploads {c['uploads_ok']}); refused by an error frame "
        f"{c['ws_refused']}; unconfirmed WS sends {sum(len(d.pending) for d in soak.devices)}"
    )
    lines.append(
        f"stored: {c['stored_messages']} messages in {len(soak.rooms)} sessions "
        f"({c['stored_questions']} questions, {c['stored_answers']} answers: completed "
        f"{c['stored_answers_completed']})"
    )
    lines.append(
        f"deliveries: expected {delivery['deliveries_expected']} (of acknowledged messages "
        f"{delivery['acked_deliveries_expected']}), received {delivery['deliveries_received']}; "
        f"LOST (acknowledged, never delivered) {delivery['lost_acked']}; other missing "
        f"{delivery['missing_other']}; duplicates {delivery['duplicates']}; gaps "
        f"{delivery['gaps']}; out of order {delivery['out_of_order']}"
    )
    answer_lat = soak.stats.answer_latencies
    lines.append(
        f"agent answers: questions acked {c['questions_acked']}, answers ended "
        f"{c['answers_completed'] + c['answers_other']} (completed {c['answers_completed']}, "
        f"other {c['answers_other']}); stream_end seen on devices with the whole stream "
        f"{c['stream_ends_seen']}, stream_end after a late join {c['stream_end_without_start']}; "
        f"question->stream_end p50 {percentile(answer_lat, 0.5):.2f} s, p99 "
        f"{percentile(answer_lat, 0.99):.2f} s"
    )
    open_streams = c["streams_unended"]
    lines.append(
        f"streams started but not ended on connections still open: {open_streams}; devices "
        f"not connected after the drain: {c['devices_not_open_after_drain']}"
    )
    lines.append(
        f"uploads: {c['uploads_ok']} of {c['uploads_sent']} stored, {c['downloads_ok']} "
        f"downloaded intact from the other instance (PNG thumbnails fetched)"
    )
    lines.append(
        f"reconnects: {c['reconnects']} planned (since_seq, either instance), "
        f"{c['unexpected_closes']} closes by the server; WebSocket connects in all "
        f"{sum(d.connects for d in soak.devices)}"
    )
    lat = soak.stats.all_latencies
    ack = soak.stats.ack_latencies
    lines.append(
        f"live delivery latency p50 {percentile(lat, 0.5):.1f} ms, p99 "
        f"{percentile(lat, 0.99):.1f} ms, max {max(lat, default=math.nan):.0f} ms; WS echo "
        f"p50 {percentile(ack, 0.5):.1f} ms, p99 {percentile(ack, 0.99):.1f} ms"
    )
    if soak.stats.errors:
        lines.append(f"error frames: {dict(soak.stats.errors)}")
    skipped = {k: v for k, v in c.items() if k.endswith(("_skipped", "_behind", "no_open_device"))}
    if skipped:
        lines.append(f"schedule: {skipped}")
    for what, n in soak.stats.failures.most_common(15):
        lines.append(f"failure x{n}: {what}")
    for kind, n in soak.stats.anomalies.most_common():
        lines.append(f"anomaly x{n}: {kind}")
    for example in soak.stats.examples[:15]:
        lines.append(f"  e.g. {example}")
    for example in delivery["examples"]:
        lines.append(f"  missing: {example}")
    flat_text, verdicts = flat_lines(flat, warmup, window)
    lines += flat_text
    for name, (levels, grouped) in logs.items():
        lines.append(f"server {name} log: {dict(levels) or 'no lines'}")
        for text, n in grouped.most_common(12):
            lines.append(f"  x{n} {text}")
    problems = (
        delivery["lost_acked"]
        + delivery["missing_other"]
        + delivery["duplicates"]
        + delivery["gaps"]
        + delivery["out_of_order"]
        + sum(soak.stats.anomalies.values())
        + open_streams
    )
    summary = {
        "counts": dict(c),
        "delivery": delivery,
        "flat": flat,
        "flat_verdicts": verdicts,
        "failures": dict(soak.stats.failures),
        "anomalies": dict(soak.stats.anomalies),
        "anomaly_examples": soak.stats.examples,
        "error_frames": dict(soak.stats.errors),
        "latency_ms": {
            "p50": percentile(lat, 0.5),
            "p99": percentile(lat, 0.99),
            "max": max(lat, default=math.nan),
        },
        "answer_latency_s": {
            "p50": percentile(answer_lat, 0.5),
            "p99": percentile(answer_lat, 0.99),
        },
        "warmup_s": warmup,
        "window_s": window,
        "problems": problems,
        "server_logs": {
            name: {"levels": dict(levels), "grouped": dict(grouped)}
            for name, (levels, grouped) in logs.items()
        },
    }
    return summary, lines


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="One-hour soak (see the module docstring).")
    parser.add_argument("--duration", type=float, default=3600, help="seconds of traffic")
    parser.add_argument(
        "--chat-service",
        default=None,
        help="the chat-service executable (default: the one beside this Python)",
    )
    parser.add_argument("--rooms", type=int, default=30, help="group rooms")
    parser.add_argument("--members", type=int, default=10, help="members (devices) per room")
    parser.add_argument("--agent-sessions", type=int, default=20)
    parser.add_argument("--agent-devices", type=int, default=2, help="WebSockets per agent session")
    parser.add_argument("--ws-rate", type=float, default=20, help="WebSocket sends per second")
    parser.add_argument("--rest-rate", type=float, default=8, help="REST sends per second")
    parser.add_argument("--agent-interval", type=float, default=2, help="s between questions")
    parser.add_argument("--upload-interval", type=float, default=3, help="s between uploads")
    parser.add_argument("--reconnect-interval", type=float, default=1, help="s between bounces")
    parser.add_argument("--reconnect-gap", type=float, default=3, help="max s a device is away")
    parser.add_argument("--sample-interval", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=300, help="s excluded from the trend")
    parser.add_argument("--window", type=float, default=600, help="s of each compared window")
    parser.add_argument("--drain-timeout", type=float, default=120)
    parser.add_argument("--max-inflight", type=int, default=400, help="operations at a time")
    parser.add_argument("--db-pool", type=int, default=10, help="DATABASE_POOL_SIZE per instance")
    parser.add_argument("--db-overflow", type=int, default=10, help="DATABASE_MAX_OVERFLOW")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--out-dir", type=Path, default=Path("soak-out"))
    parser.add_argument("--csv", type=Path, default=None, help="default OUT_DIR/soak.csv")
    parser.add_argument("--plot", type=Path, default=None, help="default OUT_DIR/soak.png")
    parser.add_argument("--summary", type=Path, default=None, help="default OUT_DIR/soak.json")
    parser.add_argument("--keep-logs", action="store_true", help="copy the server logs to OUT_DIR")
    parser.add_argument(
        "--replot",
        type=Path,
        default=None,
        metavar="CSV",
        help="run nothing: recompute the flatness figures and redraw --plot from a CSV of an "
        "earlier run (give the same --duration, --warmup and --window)",
    )
    parser.add_argument("--title", default=None, help="the plot's title (with --replot)")
    args = parser.parse_args(argv)
    if args.chat_service is None:
        beside = Path(sys.executable).with_name("chat-service")
        args.chat_service = str(beside) if beside.exists() else shutil.which("chat-service")
    if not args.chat_service:
        parser.error("no chat-service executable found; pass --chat-service")
    if min(args.rooms, args.members, args.agent_sessions, args.agent_devices) < 1:
        parser.error("rooms, members, agent sessions and devices must be >= 1")
    if min(args.agent_interval, args.upload_interval, args.reconnect_interval) <= 0:
        parser.error("intervals must be > 0")
    args.csv = args.csv or args.out_dir / "soak.csv"
    args.plot = args.plot or args.out_dir / "soak.png"
    args.summary = args.summary or args.out_dir / "soak.json"
    return args


def git_commit(chat_service: str) -> str:
    """The commit of the checkout the chat-service executable belongs to, if any."""
    root = Path(chat_service).resolve().parent.parent.parent
    done = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def replot(args: argparse.Namespace) -> int:
    """Flatness and plot again from an earlier run's CSV (nothing is started)."""
    with args.replot.open(newline="") as handle:
        samples: list[dict[str, Any]] = list(csv.DictReader(handle))
    warmup, window = windows(args)
    lines, _ = flat_lines(all_flatness(samples, args.duration, warmup, window), warmup, window)
    print("\n".join(lines))
    title = args.title or (
        f"chat-service soak: 2 instances, PostgreSQL + Redis, {args.duration / 60:.0f} min "
        f"({args.replot.name})"
    )
    plot(samples, args.plot, title, warmup, window, args.duration)
    print(f"plot: {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot is not None:
        return replot(args)
    interrupt_on_signals()
    for path in (args.csv, args.plot, args.summary):
        path.parent.mkdir(parents=True, exist_ok=True)
    commit = git_commit(args.chat_service)
    one, five, _ = os.getloadavg()
    print(
        f"soak: {args.duration:.0f} s, {os.cpu_count()} cores, load average {one:.2f}/{five:.2f};"
        f" chat-service {args.chat_service} (commit {commit})\n"
        f"  {' '.join(sys.argv)}",
        flush=True,
    )
    soak: Soak | None = None
    outcome = 2
    logs: dict[str, tuple[Counter[str], Counter[str]]] = {}
    try:
        with started(
            backend="postgres",
            names=INSTANCES,
            redis=True,
            program=(args.chat_service,),
            scrub=SOAK_SCRUB,
            max_connections=2000,
            db_pool=args.db_pool,
            db_overflow=args.db_overflow,
            admin_url=SOAK_ADMIN_URL,
            db_prefix="soak",
            prefix="soak",
            verbose=True,
        ) as stack:
            assert stack.redis is not None
            try:
                print(
                    f"database {stack.database}, redis-server on {stack.redis.port} (pid "
                    f"{stack.redis.pid}), "
                    + ", ".join(
                        f"instance {s.name} on {s.port} (pid {s.pid})" for s in stack.servers
                    ),
                    flush=True,
                )
                with args.csv.open("w", newline="") as handle:
                    csv.writer(handle).writerow(CSV_COLUMNS)
                    soak = Soak(args, stack, handle)
                    run_async(soak.run())
                outcome = 0
            finally:
                # Stopped here, before the work directory goes: a log is complete only
                # once its server has stopped.
                for server in stack.servers:
                    if server.process.poll() is not None:
                        print(f"instance {server.name} had exited with {server.process.returncode}")
                    server.stop()
                    logs[server.name] = log_problems(server)
                    if args.keep_logs:
                        with contextlib.suppress(OSError):
                            shutil.copy(server.log_path, args.out_dir / f"server-{server.name}.log")
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    except Exception as exc:
        print(f"soak failed: {type(exc).__name__}: {exc}", flush=True)
    if soak is None or not soak.samples:
        return 2
    summary, lines = report(soak, args, logs)
    summary.update({"commit": commit, "args": {k: str(v) for k, v in vars(args).items()}})
    args.summary.write_text(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
    print("\n".join(lines))
    warmup, window = windows(args)
    try:
        plot(
            soak.samples,
            args.plot,
            f"chat-service soak, commit {commit}: 2 instances, PostgreSQL + Redis, "
            f"{args.duration / 60:.0f} min",
            warmup,
            window,
            args.duration,
        )
        print(f"plot: {args.plot}")
    except ImportError:
        print("plot skipped: matplotlib is not installed")
    print(f"samples: {args.csv}; summary: {args.summary}")
    if outcome != 0:
        return outcome
    ok = summary["problems"] == 0 and not soak.stats.failures
    print(f"result: {'OK' if ok else 'PROBLEMS FOUND'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
