#!/usr/bin/env python
"""Agent streaming benchmark: overhead vs. the upstream, 200 concurrent answers, cancel.

    .venv/bin/python bench/agent_streams.py [--part a,b,c] [--backend sqlite|postgres] \
        [--repeat N] [--wait-quiet S]

Parts (each starts its own servers and tears them down before the next):

(a) overhead  One `chat-service serve` and a fake OpenAI-compatible upstream in a process
    of its own (`tests/fakes/openai_server.py`, the test suite's fake, on a free
    127.0.0.1 port). An `openai` agent is created with POST /api/chat/agents (an admin
    token) whose `settings.base_url` points at the fake; every question carries the fake's
    markers `fake:chunks=N fake:delay_ms=D`, so the fake answers with N pieces, D ms
    apart (the first piece at once). The same answer is fetched `--answers` times per
    path, the paths interleaved (rotated each round) so that other load hits them alike:
      direct  the official `openai` SDK calling the fake itself (system prompt + question,
              as the service sends them): time to the first content delta and to the end
              of the stream;
      ws      a fresh agent session and WebSocket per answer (connected and proven live by
              a pong before the clock starts): from sending the `message` frame to the
              first `stream_chunk` and to `stream_end`;
      sse     a fresh agent session per answer: from sending POST …/messages/stream to
              the first `stream_chunk` event and to `stream_end`.
    The service's overhead is its percentile minus the direct one. Every answer is checked
    (N chunks, indexes 0..N-1, stream_end completed with chunks = N). `--warmup` rounds
    run first and are not counted.

(b) concurrent  One server with the demo backend (STREAM_DELAY_MS=`--stream-delay-ms`,
    STREAM_CHUNK_SIZE=`--chunk-size`). `--streams` users each own one agent session with
    the built-in demo agent and one WebSocket viewer that also asks the questions; the
    question is padded so that the demo answer has about `--answer-chunks` chunks. For
    `--duration` s every viewer asks, reads the whole answer, and asks again at once, so
    `--streams` answers stream concurrently; answers under way when the time is up are
    read to their end (bounded by `--drain-timeout`). Reported over the window: chunks
    delivered per second (chunks received inside the window / its length), the mean
    number of answers in flight, p50/p99/max of the delay between consecutive chunks of an
    answer as its viewer saw them (every gap of every answer), and CPU. Every answer is
    checked complete: indexes 0..n-1 without gap or duplicate, stream_end `completed` with
    `chunks` = n, and the text equals the demo agent's answer to that question.

(c) cancel  Two servers on one fresh PostgreSQL database and the benchmark's own
    redis-server (REDIS_URL on both). Per sample: a fresh agent session; the user's device
    1 connects to instance A, device 2 to instance B; device 1 sends the question on A, so
    the answer runs on A; once device 2 has received chunk `--cancel-after` it cancels, by
    REST (POST B/api/chat/streams/{id}/cancel) or by the WS frame
    {"type":"cancel","message_id":…} on its socket to B, alternately. Latency = from
    sending the cancel to device 2 receiving `stream_end` with status `cancelled` (also
    shown: to device 1 on A, and the chunks device 2 still received after cancelling).
    The agent is the demo one (STREAM_DELAY_MS=`--cancel-delay-ms`, an answer of about
    `--cancel-answer-chunks` chunks), or with `--cancel-agent openai` an `openai` agent on
    the fake upstream (`--cancel-answer-chunks` pieces, `--cancel-delay-ms` apart).

Servers, databases and redis-server are started, and CPU is measured, by bench/harness, as
in every bench script: fixed JWT_SECRET_KEY (tokens minted here), LOG_LEVEL=WARNING,
RATE_LIMIT_ENABLED=false, SQLite in a temporary DATA_DIR or a fresh PostgreSQL database on
BENCH_POSTGRES_URL (default postgresql://postgres@127.0.0.1:5432/test, migrated, dropped
at the end), `--db-pool` connections per instance without overflow; the caller's STREAM_*,
AGENT_* and OPENAI_* settings are left out so they cannot change a scenario. Each report
shows the CPU share of one core each of this run's processes used during the measurement
(server(s), upstream fake, redis-server, this client, PostgreSQL backends), how many cores
the whole machine was busy and how many of them outside this benchmark ("other load"),
and the busiest other processes. `--wait-quiet S` first waits up to S s for an idle
machine.

Every wait is bounded; servers, the fake upstream, redis-server, the temporary directory
and the database are cleaned up on success, errors, Ctrl-C and SIGTERM. Only 127.0.0.1.
Exit status 1 when any check failed, 2 when a part could not be carried out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import multiprocessing as mp
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import orjson
from harness.clients import API, bearer, close_ws, create_session, open_live, token, ws_url
from harness.machine import quiet_machine
from harness.run import add_run_args, guarded, run_async, stop_child
from harness.server import die_with_parent
from harness.stack import Stack, started

from chatservice.agents.base import AgentRequest, Turn
from chatservice.agents.demo import demo_answer
from chatservice.tally import percentile as pct

ROOT = Path(__file__).resolve().parent.parent
JSON = dict[str, Any]
SYSTEM_PROMPT = "You are the benchmark's agent."
MODEL = "bench-model"
SAMPLE_TIMEOUT = 60.0  # one answer, one cancel sample
UPSTREAM_READY_TIMEOUT = 30.0
FILLER = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
_EARLIER = re.compile(r"This conversation had (\d+) earlier message")
# The caller's agent settings must not change the scenario.
AGENT_SCRUB = ("DEBUG", "DATABASE_", "REDIS_", "STREAM_", "AGENT_", "OPENAI_")


# ---------------------------------------------------------------------------------------
# the fake upstream, in a process of its own
# ---------------------------------------------------------------------------------------


def _upstream_main(pipe: Pipe) -> None:
    """Child: the test suite's fake OpenAI server until the parent says stop or dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when this ends
    die_with_parent()
    sys.path.insert(0, str(ROOT))
    from tests.fakes.openai_server import FakeOpenAI

    fake = FakeOpenAI().start()
    try:
        pipe.send(("ready", fake.base_url))
        with contextlib.suppress(EOFError, OSError):
            pipe.recv()
    finally:
        fake.stop()


@dataclass
class Upstream:
    process: mp.process.BaseProcess
    pipe: Pipe
    base_url: str = ""
    name: str = "upstream"

    @property
    def pid(self) -> int:
        return self.process.pid or 0

    def env(self) -> dict[str, str]:
        # The service calls only upstreams its operator allowed: allow the fake.
        return {"AGENT_ALLOWED_BASE_URLS": self.base_url}

    def stop(self) -> None:
        stop_child(self.process, self.pipe, ("stop",), 10)


def start_upstream(_workdir: Path) -> Upstream:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_upstream_main, args=(child,), daemon=True, name="fake-openai")
    process.start()
    child.close()
    upstream = Upstream(process, parent)
    try:
        if not parent.poll(UPSTREAM_READY_TIMEOUT):
            raise RuntimeError("the fake OpenAI upstream did not start")
        _, upstream.base_url = parent.recv()
    except BaseException:
        upstream.stop()
        raise
    return upstream


# ---------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return "nan" if math.isnan(seconds) else f"{seconds * 1000:.1f}"


def signed_ms(seconds: float) -> str:
    return "nan" if math.isnan(seconds) else f"{seconds * 1000:+.1f}"


# ---------------------------------------------------------------------------------------
# the service's side: agents, answers read off WS or SSE
# ---------------------------------------------------------------------------------------


async def create_agent(base_url: str, name: str, settings: JSON) -> int:
    admin = token(f"bench-admin-{uuid.uuid4().hex[:6]}", roles=["admin"])
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
        response = await http.post(
            f"{API}/agents",
            json={"name": name, "backend": "openai", "settings": settings},
            headers=bearer(admin),
        )
    if response.status_code != 201:
        raise RuntimeError(f"POST /agents: {response.status_code} {response.text[:300]}")
    return int(response.json()["id"])


async def demo_agent(base_url: str, user_token: str) -> tuple[int, str]:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
        response = await http.get(f"{API}/agents", headers=bearer(user_token))
    response.raise_for_status()
    for agent in response.json()["agents"]:
        if agent.get("backend") == "demo":
            return int(agent["id"]), str(agent["name"])
    raise RuntimeError("no demo agent in GET /api/chat/agents")


def expected_demo(agent_name: str, question: str, earlier: int) -> str:
    """The demo agent's answer to `question` after `earlier` user messages."""
    turns = [Turn("user", "earlier")] * earlier + [Turn("user", question)]
    agent = cast(Any, SimpleNamespace(name=agent_name))
    return demo_answer(AgentRequest(agent=agent, settings={}, turns=turns))


def padded_question(prefix: str, length: int) -> str:
    text = prefix + " " + FILLER * (length // len(FILLER) + 1)
    return text[: max(len(prefix), length)].strip()


@dataclass
class Answer:
    """One agent answer as one client saw it (times: time.perf_counter())."""

    sent_at: float
    client_msg_id: str | None = None
    question_id: str | None = None  # from the client's own echo
    message_id: str | None = None
    reply_to: str | None = None
    start_at: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    indexes: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    end: JSON | None = None
    end_at: float | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.end is not None

    def feed(self, frame: JSON, now: float) -> None:
        kind = frame.get("type")
        if kind == "message":
            if self.client_msg_id and frame.get("client_msg_id") == self.client_msg_id:
                self.question_id = frame.get("message_id")
            return
        if kind == "stream_start":
            if self.message_id is None:
                self.message_id = frame.get("message_id")
                self.reply_to = frame.get("reply_to")
                self.start_at = now
            return
        if frame.get("message_id") != self.message_id or self.message_id is None:
            if kind == "error":
                self.errors.append(f"{frame.get('code')}: {frame.get('message')}")
            return
        if kind == "stream_chunk":
            self.chunk_times.append(now)
            self.indexes.append(int(frame.get("index", -1)))
            self.texts.append(str(frame.get("content", "")))
        elif kind == "stream_end":
            self.end, self.end_at = frame, now
        elif kind == "error":
            self.errors.append(f"{frame.get('code')}: {frame.get('message')}")

    @property
    def status(self) -> str:
        return str(self.end.get("status")) if self.end else "unfinished"

    def problem(self, chunks: int | None = None, status: str = "completed") -> str | None:
        """Why this answer is not complete and in order, or None."""
        if self.end is None:
            return f"no stream_end ({len(self.indexes)} chunks seen)"
        if self.errors:
            return f"error frame: {self.errors[0]}"
        if self.status != status:
            return f"stream_end status {self.status!r}, expected {status!r}"
        if self.indexes != list(range(len(self.indexes))):
            return f"chunk indexes not 0..n-1: {self.indexes[:10]}…"
        if self.end.get("chunks") != len(self.indexes):
            return f"stream_end chunks {self.end.get('chunks')}, received {len(self.indexes)}"
        if chunks is not None and len(self.indexes) != chunks:
            return f"{len(self.indexes)} chunks, expected {chunks}"
        if self.question_id and self.reply_to != self.question_id:
            return f"stream_start reply_to {self.reply_to}, question was {self.question_id}"
        return None


async def read_ws_answer(ws: Any, answer: Answer, until: Callable[[Answer], bool]) -> None:
    """Feed frames of `ws` to `answer` until `until(answer)` (the caller bounds the time)."""
    loads = orjson.loads
    now = time.perf_counter
    while not until(answer):
        raw = await ws.recv(decode=False)
        answer.feed(loads(raw), now())


def message_frame(content: str, client_msg_id: str) -> str:
    frame = {"type": "message", "content": content, "client_msg_id": client_msg_id}
    return orjson.dumps(frame).decode()


@dataclass
class Report:
    part: str
    title: str
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    row: dict[str, str] = field(default_factory=dict)  # for the summary table

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        out = [f"== {self.title}", *self.lines]
        out += [f"problem: {p}" for p in self.problems[:10]]
        if len(self.problems) > 10:
            out.append(f"… and {len(self.problems) - 10} more problems")
        out.append(f"result:                   {'OK' if self.ok else 'FAILED'}")
        return "\n".join(out)


# ---------------------------------------------------------------------------------------
# (a) overhead against the upstream
# ---------------------------------------------------------------------------------------


async def bench_overhead(stack: Stack, args: argparse.Namespace) -> Report:
    from openai import AsyncOpenAI

    server = stack.servers[0]
    upstream = upstream_of(stack)
    settings = {
        "model": MODEL,
        "base_url": upstream.base_url,
        "api_key": "bench-key",
        "system_prompt": SYSTEM_PROMPT,
    }
    agent_id = await create_agent(server.base_url, "bench-fake", settings)
    user_token = token(f"bench-{uuid.uuid4().hex[:6]}")
    chunks, delay = args.chunks, args.chunk_delay_ms
    markers = f"fake:chunks={chunks} fake:delay_ms={delay}"
    sdk = AsyncOpenAI(base_url=upstream.base_url, api_key="bench-key", max_retries=0, timeout=60)
    http = httpx.AsyncClient(base_url=server.base_url, timeout=60)
    paths = ["direct", *args.via]
    ttft: dict[str, list[float]] = {p: [] for p in paths}
    full: dict[str, list[float]] = {p: [] for p in paths}
    server_ms: dict[str, list[float]] = {p: [] for p in paths}
    problems: list[str] = []

    async def direct(question: str) -> tuple[float, float, float]:
        t0 = time.perf_counter()
        first = math.nan
        pieces = 0
        stream = await sdk.chat.completions.create(
            model=MODEL,
            messages=[
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": question},
            ],
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            for choice in chunk.choices or ():
                if choice.delta and choice.delta.content:
                    pieces += 1
                    if pieces == 1:
                        first = time.perf_counter()
        end = time.perf_counter()
        if pieces != chunks:
            raise RuntimeError(f"direct: {pieces} pieces, expected {chunks}")
        return first - t0, end - t0, math.nan

    def checked(answer: Answer, t0: float, path: str) -> tuple[float, float, float]:
        problem = answer.problem(chunks)
        if problem:
            raise RuntimeError(f"{path}: {problem}")
        assert answer.end is not None and answer.end_at is not None
        return (
            answer.chunk_times[0] - t0,
            answer.end_at - t0,
            float(answer.end.get("latency_ms") or 0) / 1000,
        )

    async def via_ws(question: str) -> tuple[float, float, float]:
        session_id = await create_session(http, user_token, agent_id=agent_id, title="bench")
        ws = await open_live(ws_url(server.base_url, session_id, user_token), "deflate", 10)
        try:
            ref = uuid.uuid4().hex
            answer = Answer(0.0, client_msg_id=ref)
            t0 = answer.sent_at = time.perf_counter()
            await ws.send(message_frame(question, ref))
            await read_ws_answer(ws, answer, lambda a: a.done)
            return checked(answer, t0, "ws")
        finally:
            await close_ws(ws)

    async def via_sse(question: str) -> tuple[float, float, float]:
        session_id = await create_session(http, user_token, agent_id=agent_id, title="bench")
        answer = Answer(0.0)
        t0 = answer.sent_at = time.perf_counter()
        async with http.stream(
            "POST",
            f"{API}/sessions/{session_id}/messages/stream",
            json={"content": question},
            headers=bearer(user_token),
        ) as response:
            if response.status_code != 200:
                raise RuntimeError(f"sse: HTTP {response.status_code}")
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    answer.feed(orjson.loads(line[5:]), time.perf_counter())
                    if answer.done:
                        break
        return checked(answer, t0, "sse")

    runners = {"direct": direct, "ws": via_ws, "sse": via_sse}

    async def one(path: str, n: int) -> tuple[float, float, float] | None:
        question = f"bench question {n} via {path} {markers}"
        try:
            async with asyncio.timeout(SAMPLE_TIMEOUT):
                return await runners[path](question)
        except Exception as exc:
            problems.append(f"{path} answer {n}: {type(exc).__name__}: {exc}")
            return None

    try:
        for n in range(args.warmup):
            for path in paths:
                await one(path, -1 - n)
        if problems:
            raise RuntimeError(f"warm-up failed: {problems[0]}")
        meter = stack.meter()
        await meter.start(args.wait_quiet)
        print(f"[a] measuring {args.answers} answers per path ({', '.join(paths)}) …", flush=True)
        started = time.monotonic()
        for n in range(args.answers):
            rotation = n % len(paths)
            for path in paths[rotation:] + paths[:rotation]:
                result = await one(path, n)
                if result is not None:
                    ttft[path].append(result[0])
                    full[path].append(result[1])
                    server_ms[path].append(result[2])
        elapsed = time.monotonic() - started
        load = await meter.stop()
    finally:
        await http.aclose()
        await sdk.close()

    report = Report(
        "a",
        f"(a) overhead vs. the upstream: {args.backend}, {args.answers} answers "
        f"per path, fake upstream answering {chunks} chunks {delay} ms apart",
        problems=problems,
    )
    report.lines += [
        f"server code:              {stack.code}",
        f"measured:                 {elapsed:.1f} s, paths interleaved",
        "path     answers   ttft p50   ttft p99   full p50   full p99   (ms; server's "
        "latency_ms p50)",
    ]
    for path in paths:
        server_p50 = pct([v for v in server_ms[path] if not math.isnan(v)], 0.5)
        report.lines.append(
            f"{path:<8} {len(full[path]):>7}   {ms(pct(ttft[path], 0.5)):>8}   "
            f"{ms(pct(ttft[path], 0.99)):>8}   {ms(pct(full[path], 0.5)):>8}   "
            f"{ms(pct(full[path], 0.99)):>8}"
            + ("" if math.isnan(server_p50) else f"   ({ms(server_p50)})")
        )
    for path in args.via:
        over = [
            pct(ttft[path], 0.5) - pct(ttft["direct"], 0.5),
            pct(ttft[path], 0.99) - pct(ttft["direct"], 0.99),
            pct(full[path], 0.5) - pct(full["direct"], 0.5),
            pct(full[path], 0.99) - pct(full["direct"], 0.99),
        ]
        report.lines.append(
            f"{'overhead ' + path + ':':<26}time to first token p50 {signed_ms(over[0])} ms, "
            f"p99 {signed_ms(over[1])} ms; full answer p50 {signed_ms(over[2])} ms, "
            f"p99 {signed_ms(over[3])} ms"
        )
        report.row[f"{path} ttft +p50/+p99"] = f"{signed_ms(over[0])} / {signed_ms(over[1])}"
        report.row[f"{path} full +p50/+p99"] = f"{signed_ms(over[2])} / {signed_ms(over[3])}"
    report.row["direct ttft p50/p99"] = (
        f"{ms(pct(ttft['direct'], 0.5))} / {ms(pct(ttft['direct'], 0.99))}"
    )
    report.row["direct full p50/p99"] = (
        f"{ms(pct(full['direct'], 0.5))} / {ms(pct(full['direct'], 0.99))}"
    )
    complete = ", ".join(f"{p} {len(full[p])}/{args.answers}" for p in paths)
    report.lines.append(f"complete answers:         {complete}")
    report.lines += load.lines()
    report.row["server cpu"] = f"{load.cpu.get('server', 0):.0%}"
    report.row["other load"] = f"{load.others:.2f}"
    for path in paths:
        if len(full[path]) != args.answers:
            report.problems.append(f"{path}: {len(full[path])} of {args.answers} answers")
    return report


# ---------------------------------------------------------------------------------------
# (b) 200 concurrent answers, one viewer each
# ---------------------------------------------------------------------------------------


@dataclass
class Viewer:
    index: int
    user: str
    token: str
    session_id: str = ""
    ws: Any = None
    answers: list[tuple[str, Answer]] = field(default_factory=list)  # (question, answer)
    failure: str | None = None


async def bench_concurrent(stack: Stack, args: argparse.Namespace) -> Report:
    server = stack.servers[0]
    run = uuid.uuid4().hex[:6]
    viewers = [Viewer(i, f"bench-{run}-v{i}", "") for i in range(args.streams)]
    for viewer in viewers:
        viewer.token = token(viewer.user)
    agent_id, agent_name = await demo_agent(server.base_url, viewers[0].token)
    # Pad the question so that the answer has about --answer-chunks chunks.
    base = len(expected_demo(agent_name, "", 0))
    question_length = max(20, args.answer_chunks * args.chunk_size - base)

    http = httpx.AsyncClient(base_url=server.base_url, timeout=30)

    async def prepare(viewer: Viewer) -> None:
        viewer.session_id = await create_session(
            http, viewer.token, agent_id=agent_id, title="bench"
        )
        url = ws_url(server.base_url, viewer.session_id, viewer.token)
        viewer.ws = await open_live(url, "deflate", 15)

    report = Report(
        "b",
        f"(b) {args.streams} concurrent answers, one viewer each: {args.backend}, "
        f"demo agent, STREAM_DELAY_MS={args.stream_delay_ms}, "
        f"STREAM_CHUNK_SIZE={args.chunk_size}, about {args.answer_chunks} chunks per answer, "
        f"{args.duration:g} s",
    )
    loop = asyncio.get_running_loop()
    try:
        for start in range(0, len(viewers), args.connect_batch):
            batch = viewers[start : start + args.connect_batch]
            done = await asyncio.gather(*(prepare(v) for v in batch), return_exceptions=True)
            failed = [r for r in done if isinstance(r, BaseException)]
            if failed:
                raise RuntimeError(
                    f"{len(failed)} viewers failed to connect, first: "
                    f"{type(failed[0]).__name__}: {failed[0]}"
                )
        meter = stack.meter()
        meter.before = await quiet_machine(args.wait_quiet)
        print(f"[b] {len(viewers)} viewers live, all asking at once …", flush=True)
        released = time.perf_counter()
        # The window opens once every viewer's first answer streams (all `--streams`
        # answers under way), and lasts --duration s; the burst before it is reported
        # apart (time to the first chunk when everyone asks at once).
        window: dict[str, float] = {}
        streaming = 0
        all_streaming = asyncio.Event()

        def first_chunk_seen() -> None:
            nonlocal streaming
            streaming += 1
            if streaming == len(viewers):
                all_streaming.set()

        def asking() -> bool:
            return "end_at" not in window or loop.time() < window["end_at"]

        async def ask(viewer: Viewer) -> None:
            n = 0
            counted = False
            try:
                while asking():
                    question = padded_question(f"bench q{viewer.index}-{n}", question_length)
                    ref = f"v{viewer.index}-{n}"
                    answer = Answer(time.perf_counter(), client_msg_id=ref)
                    viewer.answers.append((question, answer))
                    n += 1
                    await viewer.ws.send(message_frame(question, ref))
                    limit = loop.time() + SAMPLE_TIMEOUT
                    if "end_at" in window:
                        limit = min(limit, window["end_at"] + args.drain_timeout)
                    async with asyncio.timeout_at(limit):
                        if n == 1:
                            await read_ws_answer(viewer.ws, answer, lambda a: a.done or a.indexes)
                            counted = True
                            first_chunk_seen()
                        await read_ws_answer(viewer.ws, answer, lambda a: a.done)
            except TimeoutError:
                viewer.failure = "answer not finished in time"
            except Exception as exc:
                viewer.failure = f"{type(exc).__name__}: {exc}"
            finally:
                if not counted:
                    first_chunk_seen()  # failed before streaming: don't hold the window

        tasks = [asyncio.create_task(ask(v)) for v in viewers]
        try:
            await asyncio.wait_for(all_streaming.wait(), SAMPLE_TIMEOUT)
        except TimeoutError:
            report.problems.append(
                f"only {streaming} of {len(viewers)} answers streaming after {SAMPLE_TIMEOUT} s"
            )
        ramp = time.perf_counter() - released
        await meter.start(None)
        window_start = time.perf_counter()
        window["end_at"] = loop.time() + args.duration
        await asyncio.sleep(args.duration)
        window_end = time.perf_counter()
        load = await meter.stop()
        await asyncio.wait(tasks, timeout=args.drain_timeout + SAMPLE_TIMEOUT)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await close_ws(*(v.ws for v in viewers))
        await http.aclose()

    length = window_end - window_start
    gaps: list[float] = []  # every gap whose later chunk arrived inside the window
    all_gaps: list[float] = []  # every gap of every answer, burst and tail included
    first_chunks: list[float] = []  # first round: question sent -> first chunk
    in_window = 0
    busy = 0.0  # answer-seconds inside the window (question sent to stream_end)
    streaming_s = 0.0  # the same, first chunk to stream_end
    # Questions asked inside the window: question -> first chunk, first -> last chunk,
    # last chunk -> stream_end (the answer being stored).
    waits: list[float] = []
    spans: list[float] = []
    tails: list[float] = []
    answers = 0
    complete = 0
    chunks_total = 0
    for viewer in viewers:
        if viewer.failure:
            report.problems.append(f"viewer {viewer.index}: {viewer.failure}")
        for n, (question, answer) in enumerate(viewer.answers):
            answers += 1
            times = answer.chunk_times
            if n == 0 and times:
                first_chunks.append(times[0] - answer.sent_at)
            chunks_total += len(times)
            for a, b in itertools.pairwise(times):
                all_gaps.append(b - a)
                if window_start <= b <= window_end:
                    gaps.append(b - a)
            in_window += sum(1 for t in times if window_start <= t <= window_end)
            finish = answer.end_at if answer.end_at is not None else window_end
            busy += max(0.0, min(finish, window_end) - max(answer.sent_at, window_start))
            if times:
                streaming_s += max(0.0, min(finish, window_end) - max(times[0], window_start))
                if window_start <= answer.sent_at <= window_end:
                    waits.append(times[0] - answer.sent_at)
                    spans.append(times[-1] - times[0])
                    if answer.end_at is not None:
                        tails.append(answer.end_at - times[-1])
            problem = answer.problem()
            if problem is None:
                text = "".join(answer.texts)
                found = _EARLIER.search(text)
                earlier = int(found.group(1)) if found else -1
                if text != expected_demo(agent_name, question, earlier):
                    problem = "text differs from the demo agent's answer"
            if problem is None:
                complete += 1
            else:
                report.problems.append(f"viewer {viewer.index} answer {n}: {problem}")
    rate = in_window / length if length > 0 else 0.0
    report.lines += [
        f"server code:              {stack.code}",
        f"burst:                    all {len(viewers)} asked at once; all streaming after "
        f"{ramp:.2f} s; first chunk p50 {ms(pct(first_chunks, 0.5))} ms, "
        f"p99 {ms(pct(first_chunks, 0.99))} ms after the question",
        f"answers:                  {answers} asked, {complete} complete and in order "
        "(indexes 0..n-1, stream_end completed with chunks = n, text = the demo answer)",
        f"chunks received:          {chunks_total} in all, {in_window} inside the "
        f"{length:.2f} s window",
        f"chunks delivered/s:       {rate:.0f} (inside the window)",
        f"answers in flight:        {busy / length:.1f} on average over the window (question "
        f"sent to stream_end), {streaming_s / length:.1f} streaming (first chunk to stream_end)",
        f"answer timeline:          question -> first chunk p50 {ms(pct(waits, 0.5))} ms, "
        f"p99 {ms(pct(waits, 0.99))} ms; first -> last chunk p50 {ms(pct(spans, 0.5))} ms, "
        f"p99 {ms(pct(spans, 0.99))} ms; last chunk -> stream_end p50 {ms(pct(tails, 0.5))} ms, "
        f"p99 {ms(pct(tails, 0.99))} ms ({len(waits)} questions asked inside the window)",
        f"inter-chunk delay:        p50 {ms(pct(gaps, 0.5))} ms   p99 {ms(pct(gaps, 0.99))} ms   "
        f"max {ms(max(gaps, default=math.nan))} ms ({len(gaps)} gaps inside the window; "
        f"the demo pauses {args.stream_delay_ms} ms)",
        f"  all gaps, burst + tail: p50 {ms(pct(all_gaps, 0.5))} ms   "
        f"p99 {ms(pct(all_gaps, 0.99))} ms   max {ms(max(all_gaps, default=math.nan))} ms",
    ]
    report.lines += load.lines()
    report.row = {
        "answers ok/asked": f"{complete}/{answers}",
        "burst s": f"{ramp:.2f}",
        "chunks/s": f"{rate:.0f}",
        "in flight": f"{busy / length:.1f}",
        "streaming": f"{streaming_s / length:.1f}",
        "ttfc p50": ms(pct(waits, 0.5)),
        "end wait p50": ms(pct(tails, 0.5)),
        "gap p50": ms(pct(gaps, 0.5)),
        "gap p99": ms(pct(gaps, 0.99)),
        "server cpu": f"{load.cpu.get('server', 0):.0%}",
        "client cpu": f"{load.cpu.get('client', 0):.0%}",
        "other load": f"{load.others:.2f}",
    }
    if answers == 0:
        report.problems.append("no answer was asked")
    return report


# ---------------------------------------------------------------------------------------
# (c) cancel from a second device on another instance
# ---------------------------------------------------------------------------------------


@dataclass
class CancelSample:
    via: str
    latency_b: float = math.nan  # cancel sent -> stream_end cancelled on B
    latency_a: float = math.nan  # cancel sent -> stream_end cancelled on A
    reply: float = math.nan  # REST: cancel sent -> HTTP answer
    chunks_after: int = 0  # chunks B still received after sending the cancel
    problem: str | None = None


async def bench_cancel(stack: Stack, args: argparse.Namespace) -> Report:
    server_a, server_b = stack.servers
    user_token = token(f"bench-{uuid.uuid4().hex[:6]}")
    if args.cancel_agent == "openai":
        settings = {
            "model": MODEL,
            "base_url": upstream_of(stack).base_url,
            "api_key": "bench-key",
            "system_prompt": SYSTEM_PROMPT,
        }
        agent_id = await create_agent(server_a.base_url, "bench-fake", settings)
        markers = f"fake:chunks={args.cancel_answer_chunks} fake:delay_ms={args.cancel_delay_ms}"

        def question(n: int) -> str:
            return f"bench cancel {n} {markers}"
    else:
        agent_id, agent_name = await demo_agent(server_a.base_url, user_token)
        length = max(20, args.cancel_answer_chunks * 10 - len(expected_demo(agent_name, "", 0)))

        def question(n: int) -> str:
            return padded_question(f"bench cancel {n}", length)

    http_a = httpx.AsyncClient(base_url=server_a.base_url, timeout=30, headers=bearer(user_token))
    http_b = httpx.AsyncClient(base_url=server_b.base_url, timeout=30, headers=bearer(user_token))
    samples: list[CancelSample] = []

    async def one(n: int, via: str) -> CancelSample:
        sample = CancelSample(via)
        session_id = await create_session(http_a, user_token, agent_id=agent_id, title="bench")
        ws_a = ws_b = None
        try:
            ws_a, ws_b = await asyncio.gather(
                open_live(ws_url(server_a.base_url, session_id, user_token), "deflate", 10),
                open_live(ws_url(server_b.base_url, session_id, user_token), "deflate", 10),
            )
            ref = uuid.uuid4().hex
            on_a = Answer(time.perf_counter(), client_msg_id=ref)
            on_b = Answer(on_a.sent_at, client_msg_id=ref)
            await ws_a.send(message_frame(question(n), ref))
            reading_a = asyncio.create_task(read_ws_answer(ws_a, on_a, lambda a: a.done))
            replying: asyncio.Task[httpx.Response] | None = None
            try:
                await read_ws_answer(
                    ws_b, on_b, lambda a: a.done or len(a.indexes) > args.cancel_after
                )
                if on_b.done:
                    sample.problem = f"the answer ended ({on_b.status}) before the cancel"
                    return sample
                message_id = on_b.message_id
                before = len(on_b.indexes)
                t0 = time.perf_counter()
                if via == "rest":

                    async def rest_cancel() -> httpx.Response:
                        response = await http_b.post(f"{API}/streams/{message_id}/cancel")
                        sample.reply = time.perf_counter() - t0
                        return response

                    replying = asyncio.create_task(rest_cancel())
                else:
                    frame = {"type": "cancel", "message_id": message_id}
                    await ws_b.send(orjson.dumps(frame).decode())
                await read_ws_answer(ws_b, on_b, lambda a: a.done)
                assert on_b.end_at is not None
                sample.latency_b = on_b.end_at - t0
                sample.chunks_after = len(on_b.indexes) - before
                if replying is not None:
                    response = await replying
                    if response.status_code != 202:
                        sample.problem = (
                            f"cancel answered {response.status_code} {response.text[:100]}"
                        )
                await reading_a
                assert on_a.end_at is not None
                sample.latency_a = on_a.end_at - t0
            finally:
                for task in (reading_a, replying):
                    if task is not None and not task.done():
                        task.cancel()
                        with contextlib.suppress(BaseException):
                            await task
            for where, answer in (("B", on_b), ("A", on_a)):
                problem = answer.problem(status="cancelled")
                if problem and sample.problem is None:
                    sample.problem = f"device on {where}: {problem}"
            return sample
        finally:
            await close_ws(ws_a, ws_b)

    vias = args.cancel_via
    try:
        for n in range(args.warmup):
            for via in vias:
                async with asyncio.timeout(SAMPLE_TIMEOUT):
                    warm = await one(-1 - n, via)
                if warm.problem:
                    raise RuntimeError(f"warm-up cancel failed: {warm.problem}")
        meter = stack.meter()
        await meter.start(args.wait_quiet)
        print(f"[c] measuring {args.cancels} cancels ({', '.join(vias)} alternately) …", flush=True)
        for n in range(args.cancels):
            via = vias[n % len(vias)]
            try:
                async with asyncio.timeout(SAMPLE_TIMEOUT):
                    samples.append(await one(n, via))
            except Exception as exc:
                samples.append(CancelSample(via, problem=f"{type(exc).__name__}: {exc}"))
        load = await meter.stop()
    finally:
        await http_a.aclose()
        await http_b.aclose()

    agent = (
        f"openai agent on the fake upstream ({args.cancel_answer_chunks} pieces "
        f"{args.cancel_delay_ms} ms apart)"
        if args.cancel_agent == "openai"
        else f"demo agent (STREAM_DELAY_MS={args.cancel_delay_ms}, about "
        f"{args.cancel_answer_chunks} chunks)"
    )
    report = Report(
        "c",
        f"(c) cancel across two instances: postgres + redis, {agent}, answer on A, cancel "
        f"from a second device on B after chunk {args.cancel_after}",
    )
    good = [s for s in samples if s.problem is None]
    report.problems += [
        f"cancel {i} ({s.via}): {s.problem}" for i, s in enumerate(samples) if s.problem
    ]
    report.lines += [
        f"server code:              {stack.code}",
        f"samples:                  {len(good)} of {len(samples)} cancelled cleanly "
        "(stream_end cancelled on both devices, indexes 0..n-1)",
        "via   samples   on B p50   on B p99   on B max   on A p50   on A p99   chunks after "
        "(max)   REST reply p50",
    ]
    for via in [*vias, "all"]:
        group = [s for s in good if via in ("all", s.via)]
        b = [s.latency_b for s in group]
        a = [s.latency_a for s in group]
        after = [s.chunks_after for s in group]
        replies = [s.reply for s in group if not math.isnan(s.reply)]
        report.lines.append(
            f"{via:<5} {len(group):>7}   {ms(pct(b, 0.5)):>8}   {ms(pct(b, 0.99)):>8}   "
            f"{ms(max(b, default=math.nan)):>8}   {ms(pct(a, 0.5)):>8}   {ms(pct(a, 0.99)):>8}   "
            f"{pct(after, 0.5):>5.0f} ({max(after, default=0)})   "
            + (ms(pct(replies, 0.5)) if replies else "-")
        )
        report.row[f"{via} n"] = str(len(group))
        report.row[f"{via} p50/p99 ms"] = f"{ms(pct(b, 0.5))} / {ms(pct(b, 0.99))}"
    report.lines += load.lines()
    report.row["other load"] = f"{load.others:.2f}"
    if len(good) < 50 and args.cancels >= 50:
        report.problems.append(f"only {len(good)} clean samples (at least 50 wanted)")
    return report


# ---------------------------------------------------------------------------------------
# driving the parts
# ---------------------------------------------------------------------------------------


def upstream_of(stack: Stack) -> Upstream:
    return next(helper for helper in stack.helpers if isinstance(helper, Upstream))


def run_part(part: str, args: argparse.Namespace) -> Report:
    bench: Callable[[Stack, argparse.Namespace], Coroutine[Any, Any, Report]]
    if part == "a":
        bench, options = bench_overhead, {"backend": args.backend, "helpers": [start_upstream]}
    elif part == "b":
        env = {
            "STREAM_DELAY_MS": str(args.stream_delay_ms),
            "STREAM_CHUNK_SIZE": str(args.chunk_size),
        }
        bench = bench_concurrent
        options = {"backend": args.backend, "env": env, "max_connections": 2 * args.streams + 100}
    else:
        bench = bench_cancel
        options = {
            "backend": "postgres",
            "names": ("serverA", "serverB"),
            "redis": True,
            "helpers": [start_upstream] if args.cancel_agent == "openai" else [],
            "env": {"STREAM_DELAY_MS": str(args.cancel_delay_ms), "STREAM_CHUNK_SIZE": "10"},
        }
    profile = args.server_profile
    with started(
        scrub=AGENT_SCRUB,
        db_pool=args.db_pool,
        profile=lambda name: Path(f"{profile}.{part}.{name}").resolve() if profile else None,
        prefix="chat-bench-agents",
        keep=args.keep,
        verbose=args.verbose,
        **options,
    ) as stack:
        report = run_async(bench(stack, args))
        report.problems += stack.problems()
    return report


def summary(reports: list[Report]) -> str:
    out: list[str] = []
    for part in "abc":
        rows = [r for r in reports if r.part == part and r.row]
        if not rows:
            continue
        keys = list(rows[0].row)
        out.append(f"part ({part})")
        out.append("| run | " + " | ".join(keys) + " | result |")
        out.append("|---:|" + "---:|" * len(keys) + "---|")
        for i, r in enumerate(rows, 1):
            cells = " | ".join(r.row.get(k, "") for k in keys)
            out.append(f"| {i} | {cells} | {'OK' if r.ok else 'FAILED'} |")
        out.append("")
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Agent streaming benchmark for chat-service (see the module docstring)."
    )
    parser.add_argument("--part", default="a,b,c", help="comma-separated parts: a, b, c")
    parser.add_argument(
        "--backend",
        choices=["sqlite", "postgres"],
        default="sqlite",
        help="database of parts (a) and (b); (c) always uses postgres + redis",
    )
    parser.add_argument("--repeat", type=int, default=1, help="run the parts this many times")
    parser.add_argument("--warmup", type=int, default=3, help="(a), (c): unmeasured rounds")
    group = parser.add_argument_group("(a) overhead")
    group.add_argument("--answers", type=int, default=200, help="answers per path")
    group.add_argument("--chunks", type=int, default=20, help="pieces of the fake's answer")
    group.add_argument("--chunk-delay-ms", type=int, default=10, help="fake: ms between pieces")
    group.add_argument("--via", default="ws,sse", help="service paths: ws, sse or both")
    group = parser.add_argument_group("(b) concurrent answers")
    group.add_argument("--streams", type=int, default=200, help="sessions = viewers")
    group.add_argument("--stream-delay-ms", type=int, default=20, help="STREAM_DELAY_MS")
    group.add_argument("--chunk-size", type=int, default=10, help="STREAM_CHUNK_SIZE")
    group.add_argument("--answer-chunks", type=int, default=50, help="chunks per answer, about")
    group.add_argument("--duration", type=float, default=15.0, help="seconds of asking")
    group.add_argument("--drain-timeout", type=float, default=60.0, help="bound on the tail")
    group.add_argument("--connect-batch", type=int, default=25, help="handshakes at a time")
    group = parser.add_argument_group("(c) cancel")
    group.add_argument("--cancels", type=int, default=60, help="samples (at least 50)")
    group.add_argument("--cancel-via", default="rest,ws", help="rest, ws or both (alternate)")
    group.add_argument("--cancel-after", type=int, default=3, help="cancel after this chunk")
    group.add_argument("--cancel-agent", choices=["demo", "openai"], default="demo")
    group.add_argument("--cancel-delay-ms", type=int, default=50, help="ms between chunks")
    group.add_argument("--cancel-answer-chunks", type=int, default=200, help="answer length")
    add_run_args(parser, "PATH.<part>.<server>")
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.part.split(",") if p.strip()]
    args.via = [p.strip() for p in args.via.split(",") if p.strip()]
    args.cancel_via = [p.strip() for p in args.cancel_via.split(",") if p.strip()]
    if not args.parts or set(args.parts) - {"a", "b", "c"}:
        parser.error("--part takes a, b and/or c")
    if not args.via or set(args.via) - {"ws", "sse"}:
        parser.error("--via takes ws and/or sse")
    if not args.cancel_via or set(args.cancel_via) - {"rest", "ws"}:
        parser.error("--cancel-via takes rest and/or ws")
    if min(args.answers, args.chunks, args.streams, args.cancels, args.repeat) < 1:
        parser.error("counts must be at least 1")
    if args.duration <= 0 or args.cancel_answer_chunks <= args.cancel_after + 5:
        parser.error("need duration > 0 and an answer well longer than --cancel-after")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load1, load5, _ = os.getloadavg()
    print(
        f"agent_streams: parts {','.join(args.parts)}, "
        + (f"backend {args.backend} for (a)/(b), " if {"a", "b"} & set(args.parts) else "")
        + f"{args.repeat} run(s); {os.cpu_count()} cores, load average {load1:.2f} / {load5:.2f}",
        flush=True,
    )

    def run_all() -> int:
        reports: list[Report] = []
        status = 0
        for run in range(args.repeat):
            for part in args.parts:
                try:
                    report = run_part(part, args)
                except Exception as exc:
                    if args.verbose:
                        raise
                    print(
                        f"error in part ({part}), run {run + 1}: {type(exc).__name__}: {exc} "
                        "(--verbose for the traceback)",
                        file=sys.stderr,
                        flush=True,
                    )
                    status = 2
                    continue
                print(report.text(), flush=True)
                reports.append(report)
        print()
        print(summary(reports))
        if status:
            return status
        return 0 if reports and all(r.ok for r in reports) else 1

    return guarded(run_all, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
