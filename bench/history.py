#!/usr/bin/env python
"""History benchmark: does `GET /api/chat/sessions/{id}/messages` stay as fast at 1,000,000
stored messages as at 10,000 (PostgreSQL)?

    .venv/bin/python bench/history.py [--sizes 10000,1000000] [--requests 2000] \
        [--warmup 200] [--limit 50] [--kinds healthz,newest,middle,start,after] \
        [--others 1.0] [--other-sessions 200] [--wait-quiet S] \
        [--out results.json]

What it does:

1. Creates a fresh PostgreSQL database on BENCH_POSTGRES_URL's server (default
   `postgresql://postgres@127.0.0.1:5432/test`, trust authentication; harness.postgres) and
   migrates it with `chatservice.store.migrate.upgrade`, as tests/conftest.py does.
2. Seeds it straight into the project's tables with asyncpg's COPY (no server involved):
   one group session of three members (the measured session) and `--other-sessions` other
   group sessions of two members. The measured session gets N messages with seq 1..N; the
   other sessions together get `--others` times N messages (1.0: the table holds 2N rows),
   interleaved with the measured session's in insertion (heap) order, as messages of many
   sessions arrive together in a real deployment. Every column is what the service itself
   writes: `msg_` ids in the service's layout, per-session gap-free `seq`, a
   `client_msg_id`, `created_at` one second apart in seq order (all in the past, so the
   service's own messages come later), the contents of `harness.content` (mostly short
   chat lines, some paragraphs and long pastes, some Korean and emoji), no deletions.
   Then each session's `last_seq`, `updated_at` and `started_at` and each member's
   `last_read_seq` are set to match, the tables are `VACUUM (ANALYZE)`d (what autovacuum
   does on its own a little later) and a CHECKPOINT is taken, so no checkpoint from the
   bulk load lands in a measurement. The seeding is checked (count, first and last seq of
   the session = N, 1, N, and its `last_seq` = N).
3. Starts `chat-service serve` on a free port (harness.server), pinned to CPU 0 with
   `taskset -c 0` (DATABASE_URL = that database, JWT_SECRET_KEY of the run,
   LOG_LEVEL=WARNING, pool 5 + 5, snapshot and idle-session jobs once a day, so neither
   runs during a measurement). This client pins itself to CPU 1; PostgreSQL is not
   pinned (it runs on both cores). GET /api/chat/sessions/{id} must report
   `message_count` = N.
4. Measures, one client (httpx, keep-alive), one request at a time, each kind in its own
   block: `--warmup` requests, then `--requests` timed requests, all with `limit=--limit`:
     healthz   GET /healthz: the floor (HTTP + client + server, no database)
     newest    no cursor: the newest page
     middle    before=c, c drawn from the middle 10 % of the session (0.45N-0.55N)
     start     before=c, c drawn from 51..550 (the first pages)
     after     after=c, c drawn from the middle 10 % of the session (walking forward)
     time      before=<created_at of message c>, c as for middle (a time cursor); not in
               the default --kinds
   Cursors are drawn with a fixed seed, so the run does not just re-read one cached page.
   Every answer is checked: 200, exactly the expected seqs in ascending order, `has_more`,
   and `total` = N. The request time is the client's wall time from sending the request to
   having read the whole body (the check is not timed). The timed requests run in chunks
   of 100: a chunk during which processes other than this run's (the server, this client,
   PostgreSQL backends of its database and parallel workers) used more than --max-other
   cores (0.15) is thrown away and measured again once the machine is quiet, so another
   benchmark starting on the machine does not end up in the percentiles; the report
   counts the chunks redone. For each block it shows p50, p90, p99, max and mean, the CPU
   of the server, this client and the rest of the machine (PostgreSQL and anything else)
   in cores, the other processes' share in the busiest kept chunk, and the busiest other
   processes over the whole block.
5. EXPLAIN (ANALYZE, BUFFERS) of the statements the store runs for each kind, time cursor
   included (`MessageStore.page` is called against a recorder that keeps its SQLAlchemy
   statements, compiled for asyncpg, so these are exactly the server's queries): PREPAREd,
   executed five times, then explained, which gives the plan the server's prepared
   statements use after their first five executions (PostgreSQL may switch to a generic
   plan then), plus the execution times of a forced custom and a forced generic plan.
6. Stops the server, tops the same database up to the next size (same rules; the
   measured session continues at seq N+1) and measures again.
7. At the end sends one message over REST and checks that it gets seq = N + 1 and ends the
   newest page (the service continues the seeded session), and drops the database.

Prints one table per size (its server column says `current`, the shipped server, as in
earlier results), then p99 at the largest size / p99 at the smallest per kind ("flat"
when within 0.8-1.2), and the EXPLAIN summary. `--out` writes everything (latencies and
plans included) as JSON.

Exit status: 1 if a check failed or the server logged an error, 2 if the run could not be
carried out, 0 otherwise (flat or not: that is the result, in the report).
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import json
import math
import os
import random
import shlex
import shutil
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import httpx
import orjson
from harness.clients import API, bearer, token
from harness.content import chat_line
from harness.machine import (
    code_version,
    cpu_seconds,
    machine_busy_seconds,
    process_cpu,
    quiet_machine,
    top_outsiders,
)
from harness.postgres import database, database_url
from harness.run import guarded
from harness.server import BASE_SCRUB, Server, server_env, start_server
from harness.stack import workdir
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg

from chatservice.domain import Cursor, isoformat
from chatservice.store.messages import MessageStore
from chatservice.store.migrate import upgrade
from chatservice.tally import percentile

SERVER = "current"  # the shipped server: what the tables and the JSON have always called it
COPY_BATCH = 50_000
CONTENT_POOL = 4096  # distinct message contents, used in turn
MEMBERS = ["alice", "bob", "chloe"]  # the measured session's members; alice owns it
KINDS = ("healthz", "newest", "middle", "start", "after", "time")
DEFAULT_KINDS = "healthz,newest,middle,start,after"
START_BAND = (51, 550)  # `start`: before=c with c in this range
MIDDLE_BAND = (0.45, 0.55)  # `middle`, `after`, `time`: c in this fraction of the session
FLAT = (0.8, 1.2)
CHUNK = 100  # requests timed together, kept or measured again as a whole
MAX_REDO = 10
CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"
MESSAGE_COLUMNS = [
    "session_id",
    "message_id",
    "seq",
    "sender_type",
    "sender_id",
    "message_type",
    "content",
    "metadata",
    "client_msg_id",
    "tokens_used",
    "latency_ms",
    "is_edited",
    "edited_at",
    "created_at",
    "deleted_at",
]


# ---------------------------------------------------------------------------------------
# the database: seed, top up
# ---------------------------------------------------------------------------------------


def message_id(ms: int, rng: random.Random) -> str:
    """`msg_` + 26 Crockford characters: 48 bits of milliseconds, 80 random bits, as
    `chatservice.domain.new_id` makes them, for the message's own time."""
    value = ms << 80 | rng.getrandbits(80)
    chars = []
    for _ in range(26):
        chars.append(CROCKFORD[value & 31])
        value >>= 5
    return "msg_" + "".join(reversed(chars))


@dataclass
class SessionRow:
    session_id: str
    members: list[str]
    last_seq: int = 0
    first_at: datetime | None = None
    last_at: datetime | None = None


@dataclass
class Seeder:
    """Writes the benchmark's sessions and messages straight into the tables."""

    url: str
    other_sessions: int
    others_ratio: float
    start: datetime  # created_at of the first seeded message
    seed: int
    big: SessionRow = field(init=False)
    others: list[SessionRow] = field(default_factory=list)
    clock: datetime = field(init=False)
    contents: list[str] = field(default_factory=list)
    rng: random.Random = field(init=False)
    written: int = 0  # rows, all sessions
    # created_at of the measured session's messages, as seconds after `start` (seq 1 first)
    big_offsets: array.array[int] = field(default_factory=lambda: array.array("q"))
    _carry: float = 0.0
    _next_other: int = 0
    _next_content: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        text_rng = random.Random(self.seed + 1)
        self.contents = [chat_line(text_rng) for _ in range(CONTENT_POOL)]
        self.clock = self.start
        run = uuid.uuid4().hex[:8]
        self.big = SessionRow(f"sess_bench{run}big", list(MEMBERS))
        self.others = [
            SessionRow(f"sess_bench{run}o{i:05d}", [f"u{i}-{run}", f"w{i}-{run}"])
            for i in range(self.other_sessions)
        ]

    def time_of(self, seq: int) -> datetime:
        """created_at of the measured session's message `seq`."""
        return self.start + timedelta(seconds=self.big_offsets[seq - 1])

    async def create_sessions(self, conn: Any) -> None:
        created = self.start - timedelta(hours=1)
        sessions = [
            (s.session_id, f"trace_{s.session_id[5:]}", s.members[0], "group", title, created)
            for s, title in [(self.big, "history bench"), *((o, "other") for o in self.others)]
        ]
        await conn.copy_records_to_table(
            "chat_sessions",
            records=sessions,
            columns=["session_id", "trace_id", "user_id", "kind", "title", "created_at"],
        )
        members = [
            (s.session_id, user, "owner" if i == 0 else "member", created)
            for s in [self.big, *self.others]
            for i, user in enumerate(s.members)
        ]
        await conn.copy_records_to_table(
            "chat_participants",
            records=members,
            columns=["session_id", "user_id", "role", "joined_at"],
        )

    def _row(self, session: SessionRow) -> tuple[Any, ...]:
        session.last_seq += 1
        self.clock += timedelta(seconds=1)
        moment = self.clock
        if session.first_at is None:
            session.first_at = moment
        session.last_at = moment
        if session is self.big:
            self.big_offsets.append(round((moment - self.start).total_seconds()))
        content = self.contents[self._next_content]
        self._next_content = (self._next_content + 1) % len(self.contents)
        sender = session.members[session.last_seq % len(session.members)]
        ms = int(moment.timestamp() * 1000)
        return (
            session.session_id,
            message_id(ms, self.rng),
            session.last_seq,
            "user",
            sender,
            "text",
            content,
            None,
            f"c{session.last_seq}",  # clients send one; it has its own unique index
            None,
            None,
            False,
            None,
            moment,
            None,
        )

    def rows(self, count: int) -> Iterator[tuple[Any, ...]]:
        """`count` more messages of the measured session, each followed by its share of
        the other sessions' messages (round robin over them)."""
        for _ in range(count):
            yield self._row(self.big)
            if not self.others:
                continue
            self._carry += self.others_ratio
            while self._carry >= 1.0:
                self._carry -= 1.0
                other = self.others[self._next_other]
                self._next_other = (self._next_other + 1) % len(self.others)
                yield self._row(other)

    async def grow_to(self, conn: Any, target: int) -> float:
        """Top the measured session up to `target` messages; returns the seconds taken."""
        began = time.monotonic()
        missing = target - self.big.last_seq
        batch: list[tuple[Any, ...]] = []
        for row in self.rows(missing):
            batch.append(row)
            if len(batch) >= COPY_BATCH:
                await conn.copy_records_to_table(
                    "chat_messages", records=batch, columns=MESSAGE_COLUMNS
                )
                self.written += len(batch)
                batch = []
        if batch:
            await conn.copy_records_to_table(
                "chat_messages", records=batch, columns=MESSAGE_COLUMNS
            )
            self.written += len(batch)
        sessions = [s for s in [self.big, *self.others] if s.last_seq]
        # The counters the service keeps, as if these messages had come through it.
        await conn.executemany(
            "UPDATE chat_sessions SET last_seq = $2, updated_at = $3, "
            "started_at = coalesce(started_at, $4) WHERE session_id = $1",
            [(s.session_id, s.last_seq, s.last_at, s.first_at) for s in sessions],
        )
        await conn.executemany(
            "UPDATE chat_participants SET last_read_seq = $2 WHERE session_id = $1",
            [(s.session_id, s.last_seq) for s in sessions],
        )
        await conn.execute("VACUUM (ANALYZE) chat_messages, chat_sessions, chat_participants")
        await conn.execute("CHECKPOINT")
        return time.monotonic() - began

    async def check(self, conn: Any) -> list[str]:
        row = await conn.fetchrow(
            "SELECT count(*) AS n, min(seq) AS lo, max(seq) AS hi FROM chat_messages "
            "WHERE session_id = $1",
            self.big.session_id,
        )
        last = await conn.fetchval(
            "SELECT last_seq FROM chat_sessions WHERE session_id = $1", self.big.session_id
        )
        n = self.big.last_seq
        if (row["n"], row["lo"], row["hi"], last) != (n, 1, n, n):
            return [
                f"seeded session: count {row['n']}, seqs {row['lo']}..{row['hi']}, "
                f"last_seq {last}; expected {n}, 1..{n}, {n}"
            ]
        return []


async def table_sizes(conn: Any) -> dict[str, Any]:
    rows = await conn.fetchval("SELECT count(*) FROM chat_messages")
    heap = await conn.fetchval("SELECT pg_relation_size('chat_messages')")
    indexes = await conn.fetchval("SELECT pg_indexes_size('chat_messages')")
    return {"rows": rows, "heap_mib": heap / 2**20, "indexes_mib": indexes / 2**20}


# ---------------------------------------------------------------------------------------
# the server
# ---------------------------------------------------------------------------------------


def start_history_server(workdir: Path, db_url: str, pin: str | None, label: str) -> Server:
    env = server_env(
        workdir,
        database_url=db_url,
        db_pool=5,
        db_overflow=5,
        scrub=(*BASE_SCRUB, "CORS_ORIGINS"),
        # Neither job may run inside a measurement (a snapshot reads the whole session).
        extra={"ARCHIVE_SNAPSHOT_INTERVAL": "1d", "SESSION_IDLE_CHECK_INTERVAL": "1d"},
    )
    return start_server(workdir, env, name=f"server-{label}", pin=pin)


# ---------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------


@dataclass
class Request:
    path: str
    first: int = 0  # expected: seqs first..last, has_more and total
    last: int = 0
    has_more: bool = False
    total: int = 0


def requests_for(
    kind: str, seeder: Seeder, n: int, limit: int, count: int, rng: random.Random
) -> list[Request]:
    base = f"{API}/sessions/{seeder.big.session_id}/messages?limit={limit}"
    middle = (max(limit + 2, int(n * MIDDLE_BAND[0])), int(n * MIDDLE_BAND[1]))
    out: list[Request] = []
    for _ in range(count):
        if kind == "healthz":
            out.append(Request("/healthz"))
        elif kind == "newest":
            out.append(Request(base, n - limit + 1, n, n > limit, n))
        elif kind in ("middle", "start", "time"):
            low, high = START_BAND if kind == "start" else middle
            c = rng.randint(max(low, limit + 1), min(high, n))
            # created_at < the time of message c: the same messages as seq < c
            cursor = isoformat(seeder.time_of(c)) if kind == "time" else str(c)
            out.append(Request(f"{base}&before={cursor}", c - limit, c - 1, c - limit > 1, n))
        elif kind == "after":
            c = rng.randint(*middle)
            out.append(Request(f"{base}&after={c}", c + 1, c + limit, c + limit < n, n))
        else:
            raise ValueError(kind)
    return out


def check_answer(request: Request, response: httpx.Response) -> str | None:
    if response.status_code != 200:
        return f"{request.path}: HTTP {response.status_code} {response.text[:200]}"
    if request.path == "/healthz":
        return None
    body = orjson.loads(response.content)
    seqs = [m["seq"] for m in body["messages"]]
    if seqs != list(range(request.first, request.last + 1)):
        got = f"{seqs[0]}..{seqs[-1]} ({len(seqs)})" if seqs else "none"
        return f"{request.path}: seqs {got}, expected {request.first}..{request.last}"
    if body["has_more"] != request.has_more or body["total"] != request.total:
        return (
            f"{request.path}: has_more {body['has_more']} total {body['total']}, expected "
            f"{request.has_more} {request.total}"
        )
    return None


@dataclass
class Block:
    kind: str
    latencies_ms: list[float]
    seconds: float  # of the kept chunks, as are the cores below
    server_cores: float
    client_cores: float
    rest_cores: float  # PostgreSQL and everything else on the machine
    others_max: float  # processes other than this run's, in the busiest kept chunk
    redone: int  # chunks measured again because other processes were busy
    outsiders: str
    load_average: tuple[float, float, float]
    problems: list[str]

    def stats(self) -> dict[str, float]:
        ordered = sorted(self.latencies_ms)
        return {
            "p50": percentile(ordered, 0.50),
            "p90": percentile(ordered, 0.90),
            "p99": percentile(ordered, 0.99),
            "max": ordered[-1] if ordered else math.nan,
            "mean": statistics.fmean(ordered) if ordered else math.nan,
        }


def run_ours(database: str) -> set[int]:
    """PostgreSQL processes working for this run: backends connected to its database
    (their process title names it) and parallel workers (of ours, while ours run)."""
    found: set[int] = set()
    needle = database.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                title = handle.read()
        except OSError:
            continue
        if needle in title or b"parallel worker for PID" in title:
            found.add(int(entry))
    return found


def others_cores(
    before: dict[int, tuple[str, float]],
    after: dict[int, tuple[str, float]],
    ours: set[int],
    elapsed: float,
) -> float:
    """Cores used by processes that are not this run's between two `process_cpu` samples
    (over at least a second: CPU time comes in clock ticks of 10 ms, one of which would be
    a sixth of a core in a chunk of 60 ms)."""
    used = sum(
        cpu - before.get(pid, (name, 0.0))[1]
        for pid, (name, cpu) in after.items()
        if pid not in ours
    )
    return max(0.0, used) / max(elapsed, 1.0)


def run_block(
    client: httpx.Client,
    server: Server,
    kind: str,
    warmup: list[Request],
    timed: list[Request],
    args: argparse.Namespace,
    database: str,
) -> Block:
    """Warm up, then time `timed` in chunks of CHUNK requests. A chunk during which other
    processes used more than --max-other cores is thrown away and measured again once the
    machine is quiet (up to MAX_REDO times; then it is kept and shows in `others_max`)."""
    problems: list[str] = []
    for request in warmup:
        problem = check_answer(request, client.get(request.path))
        if problem and len(problems) < 5:
            problems.append("warm-up " + problem)
    if args.wait_quiet > 0:
        asyncio.run(quiet_machine(args.wait_quiet))
    pid = server.process.pid
    latencies: list[float] = []
    seconds = server_cpu = client_cpu = busy = others_max = 0.0
    redone = 0
    block_before, block_began = process_cpu(), time.monotonic()
    clock = time.perf_counter_ns
    for first in range(0, len(timed), CHUNK):
        chunk = timed[first : first + CHUNK]
        for attempt in range(MAX_REDO + 1):
            procs_before = process_cpu()
            server_before, client_before = cpu_seconds(pid), time.process_time()
            busy_before, began = machine_busy_seconds(), time.monotonic()
            measured: list[float] = []
            for request in chunk:
                t0 = clock()
                response = client.get(request.path)
                measured.append((clock() - t0) / 1e6)
                problem = check_answer(request, response)
                if problem and len(problems) < 10:
                    problems.append(problem)
            elapsed = time.monotonic() - began
            others = others_cores(
                procs_before, process_cpu(), {pid, os.getpid()} | run_ours(database), elapsed
            )
            if others <= args.max_other or attempt == MAX_REDO:
                latencies += measured
                seconds += elapsed
                server_cpu += cpu_seconds(pid) - server_before
                client_cpu += time.process_time() - client_before
                busy += machine_busy_seconds() - busy_before
                others_max = max(others_max, others)
                break
            redone += 1
            asyncio.run(quiet_machine(max(args.wait_quiet, 60.0)))
    outsiders = top_outsiders(
        block_before, process_cpu(), {pid, os.getpid()}, time.monotonic() - block_began
    )
    return Block(
        kind,
        latencies,
        seconds,
        server_cpu / seconds,
        client_cpu / seconds,
        max(0.0, busy - server_cpu - client_cpu) / seconds,
        others_max,
        redone,
        outsiders,
        os.getloadavg(),
        problems,
    )


# ---------------------------------------------------------------------------------------
# EXPLAIN of the store's own statements
# ---------------------------------------------------------------------------------------


class _Nothing:
    """A result without rows, whichever way the store reads it."""

    def all(self) -> list[Any]:
        return []

    def first(self) -> None:
        return None

    def scalar_one(self) -> int:
        return 0

    def scalar_one_or_none(self) -> None:
        return None


class _Recorder:
    """Stands in for `Database`: keeps the statements a store method executes."""

    is_sqlite = False

    def __init__(self) -> None:
        self.statements: list[Any] = []

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[_Recorder]:
        yield self

    write = read

    async def execute(self, statement: Any, *_args: Any) -> _Nothing:
        self.statements.append(statement)
        return _Nothing()


def compiled(statement: Any) -> tuple[str, list[Any]]:
    """(SQL with $n, values) as the server's asyncpg dialect compiles the statement."""
    done = statement.compile(dialect=PGDialect_asyncpg())
    params = done.construct_params()
    return str(done), [params[name] for name in done.positiontup or []]


def page_statements(
    session_id: str, before: Cursor | None, after: Cursor | None, limit: int
) -> list[tuple[str, list[Any]]]:
    """The statements `MessageStore.page` runs for these arguments: the page, then `total`."""
    recorder = _Recorder()
    store = MessageStore(recorder)  # type: ignore[arg-type]
    asyncio.run(store.page(session_id, before=before, after=after, limit=limit))
    return [compiled(statement) for statement in recorder.statements]


def sql_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, datetime):
        return f"'{value.isoformat()}'::timestamptz"
    raise TypeError(f"no literal for {type(value).__name__}")


def _execution_ms(plan: list[str]) -> float:
    for line in plan:
        if line.startswith("Execution Time:"):
            return float(line.split()[2])
    return math.nan


async def explain(url: str, statements: list[tuple[str, list[Any]]]) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(url, timeout=10)
    out = []
    try:
        for index, (sql, values) in enumerate(statements):
            name = f"bench_q{index}"
            await conn.execute(f"PREPARE {name} AS {sql}")
            execute = f"EXECUTE {name}({', '.join(sql_literal(v) for v in values)})"
            # As the server's prepared statements run: custom plans for the first five
            # executions, then PostgreSQL may settle on a generic plan.
            for _ in range(5):
                await conn.execute(execute)
            plan = [r[0] for r in await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {execute}")]
            forced: dict[str, float] = {}
            for mode in ("force_custom_plan", "force_generic_plan"):
                await conn.execute(f"SET plan_cache_mode = {mode}")
                rows = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {execute}")
                forced[mode] = _execution_ms([r[0] for r in rows])
            await conn.execute("RESET plan_cache_mode")
            await conn.execute(f"DEALLOCATE {name}")
            out.append(
                {
                    "sql": sql,
                    "values": [sql_literal(v) for v in values],
                    "plan": plan,
                    "execution_ms": _execution_ms(plan),
                    "custom_ms": forced["force_custom_plan"],
                    "generic_ms": forced["force_generic_plan"],
                }
            )
    finally:
        await conn.close(timeout=5)
    return out


def plan_summary(plan: list[str]) -> str:
    """The plan's nodes on one line, each with its actual rows and rows removed by its
    filter: `Limit [51] > Index Scan Backward using uq_… [51]`."""
    nodes: list[str] = []
    for line in plan:
        text = line.strip().removeprefix("->").strip()
        if text.startswith("Rows Removed by Filter:") and nodes:
            nodes[-1] = nodes[-1][:-1] + f", {text.split(':')[1].strip()} filtered out]"
        if "(cost=" not in text:
            continue
        label = text.split("  (cost=")[0]
        rows = (
            text.split("actual time=")[1].split(" rows=")[1].split()[0] if "actual" in text else ""
        )
        nodes.append(f"{label} [{rows}]")
    return " > ".join(nodes)


def explain_all(seeder: Seeder, url: str, size: int, args: argparse.Namespace) -> dict[str, Any]:
    """Plans of the statements of each kind (the time cursor's too)."""
    session_id = seeder.big.session_id
    middle = int(size * sum(MIDDLE_BAND) / 2)
    cursors: dict[str, tuple[Cursor | None, Cursor | None]] = {
        "newest": (None, None),
        "middle": (Cursor(seq=middle), None),
        "start": (Cursor(seq=sum(START_BAND) // 2), None),
        "after": (None, Cursor(seq=middle)),
        "time": (Cursor(moment=seeder.time_of(middle)), None),
    }
    out: dict[str, Any] = {}
    for kind, (before, after) in cursors.items():
        statements = page_statements(session_id, before, after, args.limit)
        out[f"{SERVER} {kind}"] = asyncio.run(explain(url, statements))
    return out


# ---------------------------------------------------------------------------------------
# one size, the whole run, the report
# ---------------------------------------------------------------------------------------


@dataclass
class SizeResult:
    size: int
    seed_seconds: float
    table: dict[str, Any]
    blocks: dict[str, Block] = field(default_factory=dict)  # by kind
    explain: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def measure(
    seeder: Seeder, url: str, workdir: Path, args: argparse.Namespace, result: SizeResult
) -> None:
    size = result.size
    database = url.rpartition("/")[2]
    server = start_history_server(workdir, url, args.pin_server, str(size))
    headers = bearer(token(MEMBERS[0], ttl_seconds=7 * 86_400))
    try:
        with httpx.Client(base_url=server.base_url, headers=headers, timeout=120) as client:
            detail = client.get(f"{API}/sessions/{seeder.big.session_id}").json()
            if detail.get("message_count") != size:
                result.problems.append(
                    f"{SERVER}: session detail says message_count "
                    f"{detail.get('message_count')}, expected {size}"
                )
            rng = random.Random(args.seed + size)  # the same cursors in every run
            for kind in args.kinds:
                warm = requests_for(kind, seeder, size, args.limit, args.warmup, rng)
                timed = requests_for(kind, seeder, size, args.limit, args.requests, rng)
                block = run_block(client, server, kind, warm, timed, args, database)
                result.blocks[kind] = block
                result.problems += [f"{SERVER}: {p}" for p in block.problems]
                print(block_line(size, block), flush=True)
    finally:
        server.stop()
        result.problems += [f"{SERVER} server log: {e}" for e in server.errors()[:5]]


def block_line(size: int, block: Block) -> str:
    s = block.stats()
    return (
        f"  N={size:,} {SERVER} {block.kind:7s} p50 {s['p50']:7.2f}  p90 "
        f"{s['p90']:7.2f}  p99 {s['p99']:7.2f}  max {s['max']:7.2f} ms  "
        f"({len(block.latencies_ms)} in {block.seconds:.0f} s; cores: server "
        f"{block.server_cores:.2f}, client {block.client_cores:.2f}, rest "
        f"{block.rest_cores:.2f}, others <= {block.others_max:.2f}; chunks redone "
        f"{block.redone}; busiest others: {block.outsiders or '-'})"
    )


def report(results: list[SizeResult], args: argparse.Namespace) -> list[str]:
    lines: list[str] = []
    for r in results:
        t = r.table
        lines += [
            "",
            f"N = {r.size:,} messages in the session; chat_messages {t['rows']:,} rows "
            f"({t['heap_mib']:.0f} MiB heap, {t['indexes_mib']:.0f} MiB indexes); seeding "
            f"took {r.seed_seconds:.0f} s",
            "",
            "| server | kind | p50 ms | p90 ms | p99 ms | max ms | mean ms | server cores "
            "| rest cores | others (max) | chunks redone |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for kind, b in r.blocks.items():
            s = b.stats()
            lines.append(
                f"| {SERVER} | {kind} | {s['p50']:.2f} | {s['p90']:.2f} | {s['p99']:.2f} "
                f"| {s['max']:.1f} | {s['mean']:.2f} | {b.server_cores:.2f} "
                f"| {b.rest_cores:.2f} | {b.others_max:.2f} | {b.redone} |"
            )
    if len(results) >= 2:
        low, high = results[0], results[-1]
        lines += [
            "",
            f"p99 at N = {high.size:,} / p99 at N = {low.size:,} (flat: {FLAT[0]}-{FLAT[1]})",
            "",
            f"| server | kind | p99 {low.size:,} ms | p99 {high.size:,} ms | ratio | flat |",
            "|---|---|---:|---:|---:|---|",
        ]
        for kind, ratio in p99_ratios(results):
            first, last = low.blocks[kind].stats()["p99"], high.blocks[kind].stats()["p99"]
            flat = "yes" if FLAT[0] <= ratio <= FLAT[1] else "**no**"
            lines.append(f"| {SERVER} | {kind} | {first:.2f} | {last:.2f} | {ratio:.2f} | {flat} |")
    for r in results:
        if not r.explain:
            continue
        lines += [
            "",
            f"EXPLAIN ANALYZE at N = {r.size:,}, ms: as the server's prepared statement runs "
            "after 5 executions / forced custom plan / forced generic plan; the plan",
        ]
        for kind, statements in r.explain.items():
            for number, st in enumerate(statements, 1):
                lines.append(
                    f"  {kind} #{number}: {st['execution_ms']:.2f} / {st['custom_ms']:.2f} / "
                    f"{st['generic_ms']:.2f}  {plan_summary(st['plan'])}"
                )
    return lines


def p99_ratios(results: list[SizeResult]) -> list[tuple[str, float]]:
    """(kind, p99 at the largest size / p99 at the smallest)."""
    low, high = results[0], results[-1]
    return [
        (kind, high.blocks[kind].stats()["p99"] / block.stats()["p99"])
        for kind, block in low.blocks.items()
        if kind in high.blocks
    ]


def to_json(results: list[SizeResult], meta: dict[str, Any]) -> Any:
    sizes = []
    for r in results:
        kinds = {
            kind: {
                **b.stats(),
                "requests": len(b.latencies_ms),
                "seconds": b.seconds,
                "server_cores": b.server_cores,
                "client_cores": b.client_cores,
                "rest_cores": b.rest_cores,
                "others_cores_max": b.others_max,
                "chunks_redone": b.redone,
                "busiest_others": b.outsiders,
                "load_average": b.load_average,
                "latencies_ms": [round(v, 3) for v in b.latencies_ms],
            }
            for kind, b in r.blocks.items()
        }
        sizes.append(
            {
                "size": r.size,
                "seed_seconds": r.seed_seconds,
                "table": r.table,
                "variants": {SERVER: kinds} if kinds else {},
                "explain": r.explain,
                "problems": r.problems,
            }
        )
    ratios = [
        {"server": SERVER, "kind": kind, "p99_ratio": ratio}
        for kind, ratio in (p99_ratios(results) if len(results) >= 2 else [])
    ]
    return {"meta": meta, "sizes": sizes, "p99_largest_over_smallest": ratios}


def run(args: argparse.Namespace) -> int:
    meta: dict[str, Any] = {
        "command": shlex.join([".venv/bin/python", "bench/history.py", *sys.argv[1:]]),
        "args": {k: v for k, v in vars(args).items() if k not in ("verbose",)},
        "code": code_version(),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
    }
    print(
        f"code {meta['code']}; {meta['cpus']} cpus; load average "
        f"{' '.join(f'{v:.2f}' for v in meta['load_average_at_start'])}",
        flush=True,
    )
    if args.pin_client is not None:
        os.sched_setaffinity(0, {int(c) for c in args.pin_client.split(",")})
    results: list[SizeResult] = []
    try:
        with (
            database("bench_history", keep=args.keep) as name,
            workdir("chat-bench-history", keep=args.keep) as scratch,
        ):
            if args.keep:
                print(f"kept: database {name}")
            url = database_url(name)
            upgrade(url.replace("postgresql://", "postgresql+asyncpg://", 1))
            planned = max(args.sizes) * (1 + args.others) + 10
            seeder = Seeder(
                url,
                args.other_sessions,
                args.others,
                start=datetime.now(UTC) - timedelta(seconds=planned, days=1),
                seed=args.seed,
            )
            for size in args.sizes:
                print(f"seeding to N = {size:,} ...", flush=True)
                seconds, table, problems = asyncio.run(seed(seeder, url, size))
                print(
                    f"  seeded in {seconds:.0f} s: chat_messages {table['rows']:,} rows, "
                    f"{table['heap_mib']:.0f} MiB heap + {table['indexes_mib']:.0f} MiB indexes",
                    flush=True,
                )
                result = SizeResult(size, seconds, table, problems=problems)
                results.append(result)
                measure(seeder, url, scratch, args, result)
                if args.explain:
                    result.explain |= explain_all(seeder, url, size, args)
            results[-1].problems += final_check(seeder, url, scratch, args)
    finally:
        for line in report(results, args):
            print(line)
        if args.out:
            meta["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
            Path(args.out).write_text(json.dumps(to_json(results, meta), indent=1) + "\n")
            print(f"results written to {args.out}")
    problems = [p for r in results for p in r.problems]
    for p in problems:
        print(f"PROBLEM: {p}")
    return 1 if problems else 0


async def seed(seeder: Seeder, url: str, size: int) -> tuple[float, dict[str, Any], list[str]]:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        if not seeder.written:
            await seeder.create_sessions(conn)
        seconds = await seeder.grow_to(conn, size)
        return seconds, await table_sizes(conn), await seeder.check(conn)
    finally:
        await conn.close(timeout=5)


def final_check(seeder: Seeder, url: str, workdir: Path, args: argparse.Namespace) -> list[str]:
    """One message sent through the service continues the seeded session at last_seq + 1."""
    server = start_history_server(workdir, url, args.pin_server, "final")
    headers = bearer(token(MEMBERS[1], ttl_seconds=3600))
    session_id = seeder.big.session_id
    expected = seeder.big.last_seq + 1
    problems = []
    try:
        with httpx.Client(base_url=server.base_url, headers=headers, timeout=120) as client:
            sent = client.post(
                f"{API}/sessions/{session_id}/messages",
                json={"content": "after the seeding", "client_msg_id": "bench-final"},
            )
            if sent.status_code != 201 or sent.json().get("seq") != expected:
                problems.append(f"send after seeding: {sent.status_code} {sent.text[:200]}")
            page = client.get(f"{API}/sessions/{session_id}/messages?limit=2").json()
            seqs = [m["seq"] for m in page["messages"]]
            if seqs != [expected - 1, expected] or page["total"] != expected:
                problems.append(f"newest page after the send: seqs {seqs}, total {page['total']}")
    finally:
        server.stop()
        problems += [f"server log: {e}" for e in server.errors()[:5]]
    if not problems:
        print(f"final check: a message sent through the service got seq {expected:,}")
    return problems


def parse_sizes(text: str) -> list[int]:
    sizes = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    if not sizes or sizes != sorted(set(sizes)) or sizes[0] < 1000:
        raise argparse.ArgumentTypeError("ascending sizes of at least 1000, e.g. 10000,1000000")
    return sizes


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="p50/p90/p99 of the history endpoint at growing session sizes "
        "(PostgreSQL); see the module docstring"
    )
    parser.add_argument(
        "--sizes",
        type=parse_sizes,
        default=[10_000, 1_000_000],
        help="messages in the measured session, ascending; the database is topped up "
        "from one to the next (default 10000,1000000)",
    )
    parser.add_argument("--requests", type=int, default=2000, help="timed requests per kind")
    parser.add_argument("--warmup", type=int, default=200, help="untimed requests before")
    parser.add_argument("--limit", type=int, default=50, help="page size (the API's default)")
    parser.add_argument(
        "--kinds",
        type=lambda text: [k for k in text.split(",") if k],
        default=DEFAULT_KINDS.split(","),
        help=f"comma-separated, of {','.join(KINDS)} (default {DEFAULT_KINDS})",
    )
    parser.add_argument(
        "--others",
        type=float,
        default=1.0,
        help="other sessions' messages per message of the measured session (0: none)",
    )
    parser.add_argument("--other-sessions", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each timed block, wait up to this long for the machine to be idle "
        "(a redone chunk waits up to max(this, 60 s))",
    )
    parser.add_argument(
        "--max-other",
        type=float,
        default=0.15,
        metavar="CORES",
        help=f"measure a chunk of {CHUNK} requests again when processes other than this "
        "run's used more than this many cores during it (default 0.15; inf: never)",
    )
    two = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    parser.add_argument(
        "--pin-server", default="0" if two else None, help="taskset CPU list (default 0)"
    )
    parser.add_argument("--pin-client", default="1" if two else None, help="(default 1)")
    parser.add_argument("--no-explain", dest="explain", action="store_false")
    parser.add_argument("--out", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the database and logs")
    parser.add_argument("--verbose", action="store_true", help="tracebacks")
    args = parser.parse_args(argv)
    unknown = set(args.kinds) - set(KINDS)
    if unknown:
        parser.error(f"unknown kinds: {', '.join(sorted(unknown))}")
    if not 1 <= args.limit <= 200:
        parser.error("--limit must be 1-200 (the API's range)")
    if args.others <= 0:
        args.others, args.other_sessions = 0.0, 0
    elif args.other_sessions < 1:
        parser.error("--others needs --other-sessions of at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return guarded(lambda: run(args), args.verbose)


if __name__ == "__main__":
    sys.exit(main())
