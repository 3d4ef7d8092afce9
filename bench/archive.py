#!/usr/bin/env python
"""Archive benchmark: ending a 10,000-message session, and reading its transcripts back.

    .venv/bin/python bench/archive.py [--backend sqlite|postgres] [--storage local|s3] \
        [--messages 10000] [--repeat 3] [--wait-quiet S]

What it does:

1. Starts one `chat-service serve` exactly as `bench/uploads.py` does
   (harness.storage: SQLite or a fresh PostgreSQL database, local blobs or the benchmark's
   own moto S3 server). ARCHIVE_SNAPSHOT_INTERVAL and SESSION_IDLE_CHECK_INTERVAL are set to one day
   so that no background snapshot of the big session lands inside a measurement.
2. `--repeat` times, each on a fresh session: creates a group session of three users with
   display names (the transcript names every sender), then sends `--messages` messages over
   REST (POST …/messages, `--insert-concurrency` requests at a time, the three users in
   turn). The contents are generated from a fixed seed (harness.content): mostly short
   chat lines, some paragraphs, a few long pastes with line breaks, some Korean and emoji;
   about 180 characters on average. Every send must answer 201, and the session must end with
   `last seq` = `--messages`.
3. Waits for a quiet machine (`--wait-quiet`), then times, one after the other, on the
   running server:
     end            POST /api/chat/sessions/{id}/end by the owner. This is the real archive
                    path: the server reads every message, formats the text and JSON
                    transcripts and writes both to the blob store before it answers; the
                    answer must say `archive.state = done`.
     archive        GET …/archive?format=text and ?format=json (read back from the store).
     transcript     GET …/transcript?format=text and ?format=json (formatted on demand).
   For each request: its time, the body's size, the server's memory (VmRSS before, peak,
   as in uploads.py) and the slowest /healthz answer during it (probed every 50 ms on a
   connection of its own), which shows how long the request kept the server's event loop
   from answering anything else.
   The archives are checked: the JSON's `message_count` and its messages, and the text's
   "Total messages" line and its message blocks, must match what was sent.
4. Prints a row per repeat and min / median over the repeats.

Exit status 1 if a check failed or the server logged errors, 2 if the run could not be
carried out.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import orjson
from harness.clients import API, bearer, create_session, new_user
from harness.content import chat_line
from harness.machine import quiet_machine
from harness.probes import HealthProbe, Memory, MemoryProbe
from harness.report import markdown_table, min_median
from harness.run import echo_command, guarded, run_async
from harness.server import Server
from harness.stack import Stack
from harness.storage import add_storage_args, started_with_storage

MB = 1_000_000
REQUEST_TIMEOUT = 300.0  # one request on a loaded 2-core machine
SEPARATOR = "\n" + "-" * 50 + "\n"  # between message blocks of the text transcript
PEOPLE = [("owner", "Alice Kim"), ("b", "Bob Lee"), ("c", "Chloe Park")]


@dataclass
class Step:
    name: str
    seconds: float
    size: int
    memory: Memory
    healthz_max_ms: float


@dataclass
class Repeat:
    number: int
    session_id: str
    insert_seconds: float
    chars: int
    steps: dict[str, Step] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    load_line: str = ""
    others: float = 0.0


async def insert_messages(
    http: httpx.AsyncClient,
    session_id: str,
    tokens: list[str],
    count: int,
    concurrency: int,
    seed: int,
) -> tuple[float, int, list[str]]:
    """Send `count` messages over REST; (seconds, characters sent, problems)."""
    rng = random.Random(seed)
    contents = [chat_line(rng) for _ in range(count)]
    gate = asyncio.Semaphore(concurrency)
    problems: list[str] = []
    highest = 0

    async def send(index: int) -> None:
        nonlocal highest
        token = tokens[index % len(tokens)]
        async with gate:
            try:
                response = await http.post(
                    f"{API}/sessions/{session_id}/messages",
                    json={"content": contents[index], "client_msg_id": f"m{index}"},
                    headers=bearer(token),
                )
            except httpx.HTTPError as exc:
                problems.append(f"message {index}: {type(exc).__name__}: {exc}")
                return
        if response.status_code != 201:
            problems.append(f"message {index}: HTTP {response.status_code} {response.text[:200]}")
            return
        highest = max(highest, int(response.json()["seq"]))

    started = time.perf_counter()
    await asyncio.gather(*(send(i) for i in range(count)))
    elapsed = time.perf_counter() - started
    if highest != count and not problems:
        problems.append(f"the last seq is {highest}, expected {count}")
    return elapsed, sum(len(c) for c in contents), problems


async def timed(
    server: Server, name: str, call: Callable[[], Awaitable[httpx.Response]]
) -> tuple[Step, httpx.Response]:
    """One request, with the server's memory and its /healthz answers during it."""
    with MemoryProbe(server.pid) as memory:
        async with HealthProbe(server.base_url, timeout=REQUEST_TIMEOUT) as health:
            started = time.perf_counter()
            response = await call()
            elapsed = time.perf_counter() - started
    assert memory.result is not None
    return Step(name, elapsed, len(response.content), memory.result, health.max_ms), response


def check_text(body: bytes, count: int) -> str | None:
    text = body.decode()
    if f"Total messages: {count}\n" not in text:
        return f"text archive does not say 'Total messages: {count}'"
    blocks = text.count(SEPARATOR)
    if blocks != count:
        return f"text archive has {blocks} message blocks, expected {count}"
    return None


def check_json(body: bytes, count: int) -> str | None:
    data = orjson.loads(body)
    messages = data.get("messages") or []
    if data.get("message_count") != count or len(messages) != count:
        return f"JSON archive has {data.get('message_count')} / {len(messages)}, expected {count}"
    if [m.get("seq") for m in messages] != list(range(1, count + 1)):
        return "JSON archive's seqs are not 1..n in order"
    return None


async def one_repeat(
    stack: Stack, http: httpx.AsyncClient, args: argparse.Namespace, number: int
) -> Repeat:
    server = stack.servers[0]
    users = [new_user(label, name) for label, name in PEOPLE]
    tokens = [token for _, token in users]
    owner_token = tokens[0]
    session_id = await create_session(
        http,
        owner_token,
        kind="group",
        title=f"archive bench {number}",
        participants=[user for user, _ in users[1:]],
    )
    print(f"[{number}] inserting {args.messages} messages into {session_id} …", flush=True)
    seconds, chars, problems = await insert_messages(
        http, session_id, tokens, args.messages, args.insert_concurrency, args.seed + number
    )
    repeat = Repeat(number, session_id, seconds, chars, problems=problems)
    if problems:
        return repeat
    print(
        f"[{number}] inserted in {seconds:.1f} s ({args.messages / seconds:.0f} msgs/s); "
        "measuring …",
        flush=True,
    )
    before = await quiet_machine(args.wait_quiet)
    meter = stack.meter()
    meter.before = before
    await meter.start(None)
    base = f"{API}/sessions/{session_id}"
    auth = bearer(owner_token)

    step, response = await timed(server, "end", lambda: http.post(f"{base}/end", headers=auth))
    repeat.steps["end"] = step
    state = (response.json().get("archive") or {}).get("state") if response.is_success else None
    if state != "done":
        repeat.problems.append(f"end: HTTP {response.status_code}, archive state {state}")
    for kind in ("archive", "transcript"):
        for fmt in ("text", "json"):

            def call(kind: str = kind, fmt: str = fmt) -> Awaitable[httpx.Response]:
                return http.get(f"{base}/{kind}", params={"format": fmt}, headers=auth)

            step, response = await timed(server, f"{kind} {fmt}", call)
            repeat.steps[step.name] = step
            if response.status_code != 200:
                repeat.problems.append(f"{step.name}: HTTP {response.status_code}")
                continue
            check = check_text if fmt == "text" else check_json
            if problem := check(response.content, args.messages):
                repeat.problems.append(f"{step.name}: {problem}")
    load = await meter.stop()
    repeat.load_line = load.text()
    repeat.others = load.others
    return repeat


def repeat_lines(r: Repeat, args: argparse.Namespace) -> list[str]:
    lines = [
        f"== repeat {r.number}: session {r.session_id}, {args.messages} messages "
        f"({r.chars / args.messages:.0f} characters on average) inserted in "
        f"{r.insert_seconds:.1f} s ({args.messages / r.insert_seconds:.0f} msgs/s over REST, "
        f"{args.insert_concurrency} at a time)"
    ]
    for step in r.steps.values():
        lines.append(
            f"  {step.name:<16}{step.seconds * 1000:>8.0f} ms  {step.size:>11,} bytes  "
            f"slowest /healthz {step.healthz_max_ms:>5.0f} ms  server {step.memory.text()}"
        )
    lines.append(f"  {r.load_line}")
    lines += [f"  problem: {p}" for p in r.problems[:5]]
    return lines


def repeat_row(r: Repeat, args: argparse.Namespace) -> dict[str, str]:
    def ms(name: str) -> str:
        step = r.steps.get(name)
        return f"{step.seconds * 1000:.0f}" if step else "-"

    end = r.steps.get("end")
    text, data = r.steps.get("archive text"), r.steps.get("archive json")
    return {
        "backend": args.backend,
        "storage": args.storage,
        "repeat": str(r.number),
        "insert msgs/s": f"{args.messages / r.insert_seconds:.0f}",
        "end ms": ms("end"),
        "text MB": f"{text.size / MB:.2f}" if text else "-",
        "JSON MB": f"{data.size / MB:.2f}" if data else "-",
        "archive text ms": ms("archive text"),
        "archive json ms": ms("archive json"),
        "transcript text ms": ms("transcript text"),
        "transcript json ms": ms("transcript json"),
        "healthz max during end ms": f"{end.healthz_max_ms:.0f}" if end else "-",
        "RSS +MiB during end": f"{end.memory.growth:+.0f}" if end else "-",
        "other load": f"{r.others:.2f}",
    }


def summary(repeats: list[Repeat], args: argparse.Namespace) -> list[str]:
    done = [r for r in repeats if not r.problems]
    lines = [f"min / median over {len(done)} repeats ({args.backend}, {args.storage}):"]
    for name in ("end", "archive text", "archive json", "transcript text", "transcript json"):
        steps = [r.steps[name] for r in done if name in r.steps]
        size = "" if name == "end" else f"{min_median([s.size / MB for s in steps], '{:.2f}')} MB; "
        lines.append(
            f"  {name:<16} {min_median([s.seconds * 1000 for s in steps]):>13} ms; "
            f"{size}slowest /healthz "
            f"{min_median([s.healthz_max_ms for s in steps])} ms; server RSS peak - before "
            f"{min_median([s.memory.growth for s in steps], '{:+.0f}')} MiB"
        )
    rates = [args.messages / r.insert_seconds for r in done]
    lines.append(f"  inserting         {min_median(rates)} msgs/s over REST")
    return lines


async def bench(stack: Stack, args: argparse.Namespace) -> list[Repeat]:
    repeats: list[Repeat] = []
    limits = httpx.Limits(max_connections=args.insert_concurrency + 2)
    async with httpx.AsyncClient(
        base_url=stack.servers[0].base_url, timeout=REQUEST_TIMEOUT, limits=limits
    ) as http:
        for number in range(1, args.repeat + 1):
            repeat = await one_repeat(stack, http, args, number)
            print("\n".join(repeat_lines(repeat, args)), flush=True)
            repeats.append(repeat)
    return repeats


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Archive time of a long session (see the module docstring)."
    )
    add_storage_args(parser)
    parser.add_argument("--messages", type=int, default=10_000, help="messages per session")
    parser.add_argument("--repeat", type=int, default=3, help="fresh sessions, one after another")
    parser.add_argument(
        "--insert-concurrency", type=int, default=16, help="message sends at a time (setup)"
    )
    parser.add_argument("--seed", type=int, default=5, help="seed of the generated contents")
    args = parser.parse_args(argv)
    if min(args.messages, args.repeat, args.insert_concurrency) < 1:
        parser.error("need messages, repeat and insert-concurrency >= 1")
    return args


ARG_NAMES = ("backend", "storage", "messages", "repeat", "insert_concurrency", "wait_quiet")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    one, five, _ = os.getloadavg()
    banner = (
        f"archive: {args.backend}, {args.storage} storage; {os.cpu_count()} cores, load average "
        f"{one:.2f} / {five:.2f}\n{echo_command('bench/archive.py', args, ARG_NAMES)}"
    )
    env = {
        # No background snapshot or idle sweep of the big sessions during a measurement.
        "ARCHIVE_SNAPSHOT_INTERVAL": "1d",
        "SESSION_IDLE_CHECK_INTERVAL": "1d",
    }

    def run_all() -> int:
        print(banner, flush=True)
        # Starting is synchronous (it runs its own event loops for PostgreSQL admin work),
        # so the server starts outside the loop that measures.
        with started_with_storage(args, env, part=f"archive-{uuid.uuid4().hex[:4]}") as stack:
            print(f"server code: {stack.code}", flush=True)
            repeats = run_async(bench(stack, args))
            problems = [p for r in repeats for p in r.problems] + stack.problems()
        print()
        print(markdown_table([repeat_row(r, args) for r in repeats]))
        print()
        print("\n".join(summary(repeats, args)))
        for problem in problems[:10]:
            print(f"problem: {problem}")
        ok = not problems and len(repeats) == args.repeat
        print(f"result: {'OK' if ok else 'FAILED'}", flush=True)
        return 0 if ok else 1

    return guarded(run_all, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
