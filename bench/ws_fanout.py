#!/usr/bin/env python
"""WebSocket fan-out benchmark: rooms x members, one windowed sender per room.

    .venv/bin/python bench/ws_fanout.py --backend sqlite|postgres|both \
        [--rooms 10 --members 50 --window 20 --duration 10]

What it does, for each backend:

1. Starts its own `chat-service serve` on a free 127.0.0.1 port with a fixed
   JWT_SECRET_KEY (so it mints tokens itself with `chatservice.auth.TokenCodec`),
   LOG_LEVEL=WARNING, RATE_LIMIT_ENABLED=false, no REDIS_URL (the in-process bus) and
   WS_MAX_CONNECTIONS raised above rooms x members. SQLite lives in a
   temporary DATA_DIR; PostgreSQL gets a fresh database (created with asyncpg on
   BENCH_POSTGRES_URL, default postgresql://postgres@127.0.0.1:5432/test, migrated with
   `chat-service migrate`, dropped at the end).
2. Creates `--rooms` group sessions of `--members` users each over REST (SDK `ChatClient`),
   then connects every member over WebSocket, `--connect-batch` handshakes at a time, and
   waits for a `pong` on each connection: the server answers `ping` only once the
   connection is attached to the hub, so every connection is known to be live before the
   first message is sent.
3. Member 0 of each room is its sender. For `--duration` seconds it sends `message` frames
   (with a `client_msg_id`) as fast as a window of `--window` unacknowledged messages
   allows; a message is acknowledged when the sender receives its own echo. Each message
   carries its send time (`metadata.t`, wall clock in µs) so every receiver measures the
   delivery latency (receive time - send time; all processes share the machine's clock).
4. When the time is up it stops sending, waits (bounded by `--drain-timeout`) for the
   senders' windows and every receiver to drain, and prints: messages sent, deliveries
   expected (sent x members: the sender's own echo counts), deliveries received, delivered
   messages/s, p50/p99 delivery latency, lost deliveries, and whether every connection got
   its room's messages with seq 1, 2, 3, … (strictly increasing, no gap, no duplicate).
   It cross-checks over REST that each room stores exactly the number of messages sent,
   and shows the CPU each process used during the sending window, to tell whether the
   server or the load generator was the limit, plus how busy the rest of the machine was
   (other processes skew the figures; `--wait-quiet` waits for an idle machine first).
   Exit status 1 if any delivery was lost, duplicated or out of order, a send failed or
   the server closed a connection; 2 if the run could not be carried out.

Why the load generator is split the way it is: the server and the generator share a 2-core
machine and both are single-threaded Python, so a generator that cannot keep up would
measure itself. The receivers (all connections but the senders, 490 by default) therefore
run in a separate process (`--receiver-procs`, default 1) on the plain `websockets` asyncio
API: `recv(decode=False)` hands raw bytes straight to `orjson.loads`, one task per
connection, no per-frame `wait_for`, uvloop when available, and per-frame work is a seq
comparison, a counter and one integer appended to an array. The senders (10 connections)
stay in the main process and use the SDK's `RealtimeConnection` (automatic reconnect off,
so a dropped connection is reported rather than repaired) — their rate is bounded
by the window, not by the client, so the SDK's per-frame convenience (a `wait_for` per
receive) costs nothing that matters — and setup and the final check use the SDK's
`ChatClient`. The CPU line of the report shows the share of a core each process used: if
the receiver process sits near 100 % the figures describe the generator, not the server.

Every wait is bounded; the server, the receiver processes, the temporary directory and
the PostgreSQL database are cleaned up on success, on errors and on Ctrl-C/SIGTERM.
All traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import math
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson
import websockets
from websockets.exceptions import ConnectionClosed as WSClosed

from chatservice.auth import TokenCodec
from chatservice.client import ChatClient, ConnectionClosed, RealtimeConnection

T = TypeVar("T")

HOST = "127.0.0.1"
POSTGRES_ADMIN_URL = os.environ.get(
    "BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
JWT_SECRET = "bench-secret-" + uuid.uuid4().hex
SERVER_READY_TIMEOUT = 30.0
SERVER_STOP_TIMEOUT = 10.0
MIGRATE_TIMEOUT = 120.0
PING_TIMEOUT = 15.0


# ---------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc), 0.0 when unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    """Resident memory of a process in MiB (Linux /proc), 0.0 when unreadable."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (Linux /proc/stat), 0.0 when unreadable."""
    try:
        with open("/proc/stat") as handle:
            values = [int(v) for v in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def process_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds of every process on the machine, by pid, with its command name."""
    found: dict[int, tuple[str, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        name = stat[stat.index(b"(") + 1 : stat.rindex(b")")].decode(errors="replace")
        fields = stat[stat.rindex(b")") + 2 :].split()
        found[int(entry)] = (name, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    return found


def top_outsiders(
    before: dict[int, tuple[str, float]],
    after: dict[int, tuple[str, float]],
    ours: set[int],
    elapsed: float,
) -> str:
    """The three busiest processes that are not part of this run, as `name(pid) share`."""
    used = [
        (cpu - before.get(pid, (name, 0.0))[1], name, pid)
        for pid, (name, cpu) in after.items()
        if pid not in ours
    ]
    used.sort(reverse=True)
    return ", ".join(
        f"{name}({pid}) {seconds / elapsed:.0%}" for seconds, name, pid in used[:3] if seconds > 0
    )


def percentile(sorted_values: list[int], q: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_values)))
    return float(sorted_values[rank - 1])


def new_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (it comes with uvicorn[standard]), else the default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_async(main: Awaitable[T]) -> T:
    with asyncio.Runner(loop_factory=new_loop) as runner:
        return runner.run(main)  # type: ignore[arg-type]


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


def _die_with_parent() -> None:
    """In the server child: get SIGTERM if this script dies without cleaning up (Linux)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# ---------------------------------------------------------------------------------------
# server and database
# ---------------------------------------------------------------------------------------


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def errors(self) -> list[str]:
        """ERROR/CRITICAL lines of the (JSON) server log, shortened to one line each."""
        found: list[str] = []
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return found
        for line in lines:
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("level") in ("ERROR", "CRITICAL"):
                exc = str(record.get("exception") or "").strip().splitlines()
                text = str(record.get("message", "")).strip()
                found.append(f"{text} {exc[-1] if exc else ''}".strip()[:300])
        return found

    def stop(self) -> None:
        if self.process.poll() is None:
            # SIGINT, like Ctrl-C: uvicorn shuts down gracefully and re-raises it, so a
            # profiled server still writes its profile (SIGTERM would end it silently).
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(SERVER_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def server_env(workdir: Path, database_url: str | None, max_connections: int) -> dict[str, str]:
    env = {
        **os.environ,
        "DATA_DIR": str(workdir / "data"),
        "JWT_SECRET_KEY": JWT_SECRET,
        "LOG_LEVEL": "WARNING",
        "WS_MAX_CONNECTIONS": str(max_connections),
    }
    # The scenario is the embedded single instance: in-process bus, no rate limit (it
    # would cap a sender long before the server's capacity), whatever the caller's env.
    env["RATE_LIMIT_ENABLED"] = "false"
    for name in ("DEBUG", "DATABASE_URL", "REDIS_URL"):
        env.pop(name, None)
    if database_url:
        env["DATABASE_URL"] = database_url
    return env


def start_server(workdir: Path, env: dict[str, str], profile: Path | None = None) -> Server:
    port = free_port()
    log_path = workdir / "server.log"
    command = [sys.executable, "-m", "chatservice.cli", "serve"]
    command += ["--host", HOST, "--port", str(port)]
    if profile is not None:  # cProfile of the server's event-loop thread, written at exit
        command[1:1] = ["-m", "cProfile", "-o", str(profile)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            env=env,
            cwd=workdir,  # no stray `.env` from wherever the script is started
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
    server = Server(process, f"http://{HOST}:{port}", log_path)
    deadline = time.monotonic() + SERVER_READY_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log_tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.base_url}/readyz", timeout=1).status_code == 200:
                return server
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"server not ready within {SERVER_READY_TIMEOUT}s:\n{server.log_tail()}")


def _database_url(name: str) -> str:
    base, _, _ = POSTGRES_ADMIN_URL.rpartition("/")
    return f"{base}/{name}"


async def _admin(sql: str) -> None:
    import asyncpg  # type: ignore[import-untyped]

    conn = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
    try:
        await conn.execute(sql, timeout=30)
    finally:
        await conn.close(timeout=5)


def create_postgres_database(name: str) -> None:
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))


def migrate_postgres(workdir: Path, env: dict[str, str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "chatservice.cli", "migrate"],
        env=env,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=MIGRATE_TIMEOUT,
    )
    if done.returncode != 0:
        raise RuntimeError(f"chat-service migrate failed:\n{done.stdout}{done.stderr}")


def drop_postgres_database(name: str) -> None:
    asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# ---------------------------------------------------------------------------------------
# receiver processes: plain websockets + orjson, one task per connection
# ---------------------------------------------------------------------------------------


@dataclass
class Member:
    room: int
    session_id: str
    user_id: str
    url: str


class Tally:
    """What one receiving connection saw."""

    __slots__ = ("bad", "closed", "count", "duplicates", "gaps", "last_seq", "room")

    def __init__(self, room: int) -> None:
        self.room = room
        self.count = 0
        self.last_seq = 0
        self.gaps = 0  # a seq arrived more than one past the previous
        self.duplicates = 0  # a seq arrived that was not above the previous
        self.bad: str | None = None  # the first anomaly, for the report
        self.closed: str | None = None  # set if the server closed the connection

    def see(self, seq: int) -> None:
        expected = self.last_seq + 1
        if seq != expected:
            if seq > expected:
                self.gaps += 1
            else:
                self.duplicates += 1
            if self.bad is None:
                self.bad = f"expected seq {expected}, got {seq}"
        self.last_seq = max(self.last_seq, seq)
        self.count += 1


async def open_live(url: str, compression: str | None, timeout: float) -> Any:
    """Connect and wait for the pong that proves the connection is attached to the hub."""
    ws = await websockets.connect(
        url,
        compression=compression,
        open_timeout=timeout,
        ping_interval=None,  # no client keepalive: a busy generator must not drop itself
        close_timeout=2,
        max_size=2**22,
    )
    try:
        await ws.send('{"type":"ping"}')
        deadline = time.monotonic() + PING_TIMEOUT
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no pong")
            raw = await asyncio.wait_for(ws.recv(decode=False), remaining)
            if orjson.loads(raw).get("type") == "pong":
                return ws
    except BaseException:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(), 2)
        raise


async def _read_loop(ws: Any, tally: Tally, latencies: array.array[int], clock: list[int]) -> None:
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
    tallies: list[Tally] = []
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
                    tallies.append(Tally(member.room))
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
            if all(t.count >= expected.get(t.room, 0) or t.closed for t in tallies):
                break
            await asyncio.sleep(0.05)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        pipe.send(
            (
                "result",
                {
                    "counts": [(t.room, t.count) for t in tallies],
                    "gaps": sum(t.gaps for t in tallies),
                    "duplicates": sum(t.duplicates for t in tallies),
                    "bad": [f"room {t.room}: {t.bad}" for t in tallies if t.bad][:5],
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
        with contextlib.suppress(Exception):
            self.pipe.send(("abort",))
        self.process.join(5)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.pipe.close()


# ---------------------------------------------------------------------------------------
# senders: the SDK's RealtimeConnection, in the main process
# ---------------------------------------------------------------------------------------


@dataclass
class Sender:
    room: int
    user_id: str
    live: RealtimeConnection
    window: asyncio.Semaphore
    tally: Tally
    sent: int = 0
    pending: set[str] = field(default_factory=set)
    latencies: list[int] = field(default_factory=list)
    # For the sender's own echoes: (server timestamp - send time, echo - server timestamp)
    # in µs. The server stamps a message inside its write transaction, once it holds the
    # session row (PostgreSQL's clock_timestamp()) or the write lock (SQLite).
    split: list[tuple[int, int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    last_ns: int = 0
    done_sending: bool = False


async def sender_reader(sender: Sender) -> None:
    """Count the sender's own deliveries and free a window slot per echo."""
    while True:
        if sender.done_sending and not sender.pending:
            return
        try:
            frame = await sender.live.receive(timeout=0.5)
        except TimeoutError:
            continue
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
                sender.window.release()
                with contextlib.suppress(KeyError, TypeError, ValueError):
                    stamped = int(datetime.fromisoformat(frame["timestamp"]).timestamp() * 1e6)
                    sender.split.append((stamped - meta["t"], received // 1000 - stamped))
        elif kind == "error":
            sender.errors.append(f"{frame.get('code')}: {frame.get('message')}")
            ref = frame.get("client_msg_id")
            if ref in sender.pending:
                sender.pending.discard(ref)
                sender.window.release()


async def sender_writer(sender: Sender, end_at: float) -> None:
    """Send as fast as the window allows until `end_at` (loop time)."""
    loop = asyncio.get_running_loop()
    n = 0
    text = f"bench message from room {sender.room}"
    try:
        while (remaining := end_at - loop.time()) > 0:
            try:
                await asyncio.wait_for(sender.window.acquire(), remaining)
            except TimeoutError:
                break
            if loop.time() >= end_at:
                sender.window.release()
                break
            n += 1
            ref = f"r{sender.room}-{n}"
            sender.pending.add(ref)
            try:
                await sender.live.send_message(
                    text, client_msg_id=ref, metadata={"t": time.time_ns() // 1000}
                )
            except (WSClosed, ConnectionClosed) as exc:
                # This sender is done; the report says why.
                sender.pending.discard(ref)
                sender.errors.append(f"connection closed while sending: {exc}")
                break
            sender.sent += 1
    finally:
        sender.done_sending = True


# ---------------------------------------------------------------------------------------
# one run
# ---------------------------------------------------------------------------------------


@dataclass
class Result:
    backend: str
    rooms: int
    members: int
    window: int
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
    cpu: dict[str, float] = field(default_factory=dict)
    machine_busy: float = 0.0  # cores busy, whole machine (PostgreSQL included)
    server_errors: int = 0
    busy_before: float = 0.0  # cores busy in the second before sending started
    server_rss_mib: float = 0.0
    code: str = ""  # git commit of the server code
    outsiders: str = ""  # the busiest other processes while sending
    to_server_p50_ms: float = math.nan
    server_to_echo_p50_ms: float = math.nan

    @property
    def others(self) -> float:
        """Cores busy outside this benchmark's processes while it was sending."""
        return max(0.0, self.machine_busy - sum(self.cpu.values()))

    @property
    def lost(self) -> int:
        return self.expected - self.received

    @property
    def delivered_per_second(self) -> float:
        return self.received / self.delivery_seconds if self.delivery_seconds > 0 else 0.0

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
        cpu = "  ".join(f"{name} {share:.0%}" for name, share in self.cpu.items())
        lines = [
            f"== {self.backend}: {self.rooms} rooms x {self.members} members ({conns} "
            f"connections), window {self.window}, {self.duration:g} s of sending",
            f"server code:              {self.code}",
            f"messages sent:            {self.sent} ({self.sent / self.send_seconds:.0f}/s)"
            if self.send_seconds
            else f"messages sent:            {self.sent}",
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
            f"sender echo, p50:         send -> server timestamp {self.to_server_p50_ms:.1f} ms, "
            f"server timestamp -> echo {self.server_to_echo_p50_ms:.1f} ms",
            f"cpu during sending:       {cpu} (share of one core); server RSS "
            f"{self.server_rss_mib:.0f} MiB",
            f"machine (all processes):  {self.machine_busy:.2f} of {os.cpu_count()} cores busy "
            f"while sending, {self.others:.2f} of them outside this benchmark; "
            f"{self.busy_before:.2f} busy just before",
            f"busiest other processes:  {self.outsiders or '-'}",
        ]
        if self.closed:
            lines.append(f"connections closed by the server: {self.closed}")
        if self.send_errors:
            lines.append(f"send errors:              {self.send_errors}")
        lines.extend(f"problem: {p}" for p in self.problems)
        lines.append(f"result:                   {'OK' if self.ok else 'FAILED'}")
        return "\n".join(lines)


async def create_rooms(
    base_url: str, codec: TokenCodec, args: argparse.Namespace, run_id: str
) -> list[tuple[str, list[str]]]:
    """`rooms` group sessions; member 0 creates the room and is its sender."""

    async def one(room: int) -> tuple[str, list[str]]:
        users = [f"bench-{run_id}-r{room}-u{i}" for i in range(args.members)]
        async with ChatClient(base_url, codec.issue(users[0]), timeout=30) as chat:
            created = await chat.create_session(
                title=f"bench room {room}", kind="group", participants=users[1:]
            )
        return str(created["session_id"]), users

    rooms: list[tuple[str, list[str]]] = []
    for start in range(0, args.rooms, 10):
        rooms.extend(
            await asyncio.gather(*(one(r) for r in range(start, min(args.rooms, start + 10))))
        )
    return rooms


async def stored_counts(
    base_url: str, codec: TokenCodec, rooms: list[tuple[str, list[str]]]
) -> int:
    total = 0
    for session_id, users in rooms:
        async with ChatClient(base_url, codec.issue(users[0]), timeout=30) as chat:
            total += int((await chat.list_messages(session_id, limit=1))["total"])
    return total


def _split(items: list[Member], parts: int) -> Iterator[list[Member]]:
    for i in range(parts):
        chunk = items[i::parts]
        if chunk:
            yield chunk


async def postgres_backend_pids(database: str) -> list[int]:
    """PIDs of the PostgreSQL backends serving `database` (the server's pool)."""
    import asyncpg

    conn = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1", database, timeout=5
        )
    finally:
        await conn.close(timeout=5)
    return [int(row["pid"]) for row in rows]


async def quiet_machine(wait: float) -> float:
    """Cores busy over the last two seconds; waits up to `wait` s for them to be < 0.25."""
    deadline = time.monotonic() + wait
    samples: list[float] = []
    while True:
        before = machine_busy_seconds()
        await asyncio.sleep(1.0)
        samples = [*samples[-1:], machine_busy_seconds() - before]
        busy = sum(samples) / len(samples)
        quiet = len(samples) == 2 and max(samples) < 0.25
        if quiet or time.monotonic() >= deadline:
            return busy


async def bench(
    server: Server, backend: str, args: argparse.Namespace, database: str | None
) -> Result:
    result = Result(backend, args.rooms, args.members, args.window, args.duration)
    codec = TokenCodec(JWT_SECRET)
    run_id = uuid.uuid4().hex[:6]
    compression = None if args.compression == "none" else "deflate"
    rooms = await create_rooms(server.base_url, codec, args, run_id)

    receivers: list[Member] = []
    for room, (session_id, users) in enumerate(rooms):
        for user in users[1:]:
            url = RealtimeConnection(server.base_url, session_id, codec.issue(user)).url
            receivers.append(Member(room, session_id, user, url))

    ctx = mp.get_context("spawn")
    workers: list[Worker] = []
    senders: list[Sender] = []
    reader_tasks: list[asyncio.Task[None]] = []
    command_timeout = args.duration + 3 * args.drain_timeout + 120
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

        # Senders connect while the receivers do (they are only `rooms` connections).
        for room, (session_id, users) in enumerate(rooms):
            # No automatic reconnect: a connection the server drops must show up in the
            # report, not be repaired behind the measurement's back.
            live = RealtimeConnection(
                server.base_url, session_id, codec.issue(users[0]), reconnect=False
            )
            await asyncio.wait_for(live.connect(), 10)
            senders.append(
                Sender(room, users[0], live, asyncio.Semaphore(args.window), Tally(room))
            )
            await live.ping()
            await live.receive_until("pong", timeout=PING_TIMEOUT)
        # Read from now on: a connection nobody reads stops reading its socket after a few
        # frames (websockets' max_queue), then misses its keepalive pongs and is closed.
        reader_tasks = [asyncio.create_task(sender_reader(s)) for s in senders]

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
            f"[{backend}] {len(receivers) + len(senders)} connections live, sending for "
            f"{args.duration:g} s ...",
            flush=True,
        )

        loop = asyncio.get_running_loop()
        result.busy_before = await quiet_machine(args.wait_quiet)
        pids = {"server": server.process.pid, "senders": os.getpid()}
        pids.update({f"receivers{i or ''}": w.process.pid or 0 for i, w in enumerate(workers)})
        pg_pids = await postgres_backend_pids(database) if database else []
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        pg_before = sum(cpu_seconds(pid) for pid in pg_pids)
        everyone_before = process_cpu()
        machine_before = machine_busy_seconds()
        start_ns = time.time_ns()
        start = loop.time()
        end_at = start + args.duration
        await asyncio.gather(*(sender_writer(s, end_at) for s in senders))
        send_elapsed = loop.time() - start
        cpu_after = {name: cpu_seconds(pid) for name, pid in pids.items()}
        result.cpu = {name: (cpu_after[name] - cpu_before[name]) / send_elapsed for name in pids}
        result.machine_busy = (machine_busy_seconds() - machine_before) / send_elapsed
        result.server_rss_mib = rss_mib(server.process.pid)
        ours = {*pids.values(), *pg_pids}
        result.outsiders = top_outsiders(everyone_before, process_cpu(), ours, send_elapsed)
        if pg_pids:
            pg_after = sum(cpu_seconds(pid) for pid in pg_pids)
            result.cpu["postgres"] = (pg_after - pg_before) / send_elapsed
        result.send_seconds = send_elapsed

        # Drain the senders' windows (their own echoes), bounded.
        _, still_running = await asyncio.wait(reader_tasks, timeout=args.drain_timeout)
        for task in still_running:
            task.cancel()
        if still_running:
            result.problems.append(
                f"{len(still_running)} senders still had unacknowledged messages after "
                f"{args.drain_timeout:g} s"
            )

        expected_per_room = {s.room: s.sent for s in senders}
        result.sent = sum(expected_per_room.values())
        result.expected = result.sent * args.members
        result.send_errors = sum(len(s.errors) for s in senders)
        for s in senders:
            result.problems.extend(f"room {s.room} send error: {e}" for e in s.errors[:3])

        for worker in workers:
            worker.pipe.send(("expect", expected_per_room, args.drain_timeout))
        latencies: list[int] = []
        last_ns = max((s.last_ns for s in senders), default=0)
        split = [pair for s in senders for pair in s.split]
        if split:
            result.to_server_p50_ms = percentile(sorted(a for a, _ in split), 0.5) / 1000
            result.server_to_echo_p50_ms = percentile(sorted(b for _, b in split), 0.5) / 1000
        for s in senders:
            latencies.extend(s.latencies)
            result.received += s.tally.count
            result.gaps += s.tally.gaps
            result.duplicates += s.tally.duplicates
            if s.tally.bad:
                result.problems.append(f"room {s.room} sender: {s.tally.bad}")
            if s.tally.closed:
                result.closed += 1
                result.problems.append(f"room {s.room} sender closed: {s.tally.closed}")
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

        result.delivery_seconds = (last_ns - start_ns) / 1e9 if last_ns else 0.0
        latencies.sort()
        result.p50_ms = percentile(latencies, 0.50) / 1000
        result.p99_ms = percentile(latencies, 0.99) / 1000
        result.max_ms = latencies[-1] / 1000 if latencies else math.nan
        if len(latencies) != result.received:
            result.problems.append(
                f"{result.received - len(latencies)} deliveries carried no send time"
            )
        result.stored = await stored_counts(server.base_url, codec, rooms)
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


def code_version() -> str:
    """The commit the server code comes from, and whether src/ differs from it."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    if not head:
        return "unknown (not a git checkout)"
    return f"{head}{' with uncommitted changes in src/' if dirty else ', src/ clean'}"


def run_backend(backend: str, args: argparse.Namespace) -> Result:
    workdir = Path(tempfile.mkdtemp(prefix=f"chat-bench-{backend}-"))
    database: str | None = None
    server: Server | None = None
    try:
        database_url = None
        if backend == "postgres":
            # Named before it exists, so an interruption during CREATE still drops it.
            database = f"chatservice_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
            create_postgres_database(database)
            database_url = _database_url(database)
        env = server_env(workdir, database_url, max(1000, 2 * args.rooms * args.members))
        if database_url:
            migrate_postgres(workdir, env)
        profile = None
        if args.server_profile:
            profile = Path(f"{args.server_profile}.{backend}").resolve()
        version_before = code_version()
        server = start_server(workdir, env, profile)
        try:
            result = run_async(bench(server, backend, args, database))
        except Exception:
            errors = server.errors()
            if errors:
                print(f"server logged {len(errors)} errors, first: {errors[0]}", file=sys.stderr)
            if server.process.poll() is not None or args.verbose:
                print(f"server log (tail):\n{server.log_tail()}", file=sys.stderr)
            raise
        result.code = version_before
        version_after = code_version()
        if version_after != version_before:
            result.code += f" (changed to {version_after} during the run)"
        if server.process.poll() is not None:
            result.problems.append(f"server exited with {server.process.returncode}")
        errors = server.errors()
        if errors:
            result.server_errors = len(errors)
            result.problems.append(f"server logged {len(errors)} errors, first: {errors[0]}")
        if args.verbose:
            print(f"server log (tail):\n{server.log_tail()}", file=sys.stderr)
        return result
    finally:
        if server is not None:
            server.stop()
        if database is not None:
            try:
                drop_postgres_database(database)
            except Exception as exc:
                print(f"warning: could not drop database {database}: {exc}", file=sys.stderr)
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def summary_table(results: list[Result]) -> str:
    head = (
        "| backend | sent | expected | received | delivered msgs/s | p50 ms | p99 ms | lost "
        "| order | other load (cores) |\n|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"
    )
    rows = [
        f"| {r.backend} | {r.sent} | {r.expected} | {r.received} | "
        f"{r.delivered_per_second:.0f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.lost} | "
        f"{'ok' if r.gaps == 0 and r.duplicates == 0 else 'FAILED'} | {r.others:.2f} |"
        for r in results
    ]
    return "\n".join([head, *rows])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="WebSocket fan-out benchmark for chat-service (see the module docstring)."
    )
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--rooms", type=int, default=10)
    parser.add_argument("--members", type=int, default=50, help="per room, sender included")
    parser.add_argument("--window", type=int, default=20, help="unacknowledged messages/sender")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of sending")
    parser.add_argument(
        "--drain-timeout", type=float, default=30.0, help="bound on waiting for the tail"
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
        "--server-profile",
        metavar="PATH",
        help="run the server under cProfile and write PATH.<backend> (slows the server; "
        "for finding hot spots, not for figures)",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before sending, wait up to this long for the machine to be idle (other "
        "processes skew the figures; the report shows how busy it was)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (server log)")
    parser.add_argument("--verbose", action="store_true", help="print the server log tail")
    args = parser.parse_args(argv)
    if args.rooms < 1 or args.members < 2 or args.window < 1 or args.duration <= 0:
        parser.error("need rooms >= 1, members >= 2, window >= 1, duration > 0")
    if args.receiver_procs < 1 or args.connect_batch < 1:
        parser.error("need receiver-procs >= 1 and connect-batch >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    # Ctrl-C (even when started from a shell that ignores SIGINT in background jobs) and
    # SIGTERM both end the run through KeyboardInterrupt: asyncio.Runner cancels the
    # running bench, whose `finally` blocks close the connections and stop the receiver
    # processes, then run_backend stops the server and drops the database.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def on_sigterm(_signum: int, _frame: object) -> None:
        os.kill(os.getpid(), signal.SIGINT)

    signal.signal(signal.SIGTERM, on_sigterm)
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    results: list[Result] = []
    try:
        for backend in backends:
            result = run_backend(backend, args)
            print(result.report(), flush=True)
            results.append(result)
    except KeyboardInterrupt:
        print("interrupted; server and temporary data cleaned up", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.verbose:
            raise
        print(f"error: {type(exc).__name__}: {exc} (--verbose for the traceback)", file=sys.stderr)
        return 2
    print()
    print(summary_table(results))
    return 0 if results and all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
