"""Helpers for the multi-instance tests: a Redis and several `chat-service serve`
processes sharing one PostgreSQL database, and clients that record what they receive.

Every wait here has a deadline; a test that waits on one of these helpers fails with
what was seen so far rather than hanging.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed as WSClosed

from chatservice.auth import TokenCodec
from chatservice.client import ChatClient, ConnectionClosed, RealtimeConnection
from tests.conftest import RedisProcess, ServerProcess, new_user, start_redis, start_server
from tests.e2e.conftest import recv_json

JSON = dict[str, Any]

# Presence settings of the instances under test: a crashed instance's connections expire
# within TIMEOUT, and the sweep that announces it runs every min(HEARTBEAT, TIMEOUT / 4).
HEARTBEAT = 0.5
TIMEOUT = 2.0
SWEEP_EVERY = min(HEARTBEAT, TIMEOUT / 4)


@dataclass
class Cluster:
    """One Redis of the test's own and N instances on it, sharing `database_url`."""

    redis: RedisProcess
    servers: list[ServerProcess]
    database_url: str

    @property
    def a(self) -> ServerProcess:
        return self.servers[0]

    @property
    def b(self) -> ServerProcess:
        return self.servers[1]

    @property
    def urls(self) -> list[str]:
        return [s.base_url for s in self.servers]

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
        self.redis.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {s.base_url}\n{s.log()[-4000:]}" for s in self.servers)


def instance_env(redis_url: str, **extra: Any) -> dict[str, Any]:
    return {
        "REDIS_URL": redis_url,
        "WS_HEARTBEAT_INTERVAL": HEARTBEAT,
        "WS_CONNECTION_TIMEOUT": TIMEOUT,
        **extra,
    }


def start_cluster(base: Path, database_url: str, count: int = 2, **extra: Any) -> Cluster:
    redis = start_redis(base / "redis")
    servers: list[ServerProcess] = []
    try:
        for i in range(count):
            servers.append(
                start_server(
                    base / f"instance-{i}", database_url, **instance_env(redis.url, **extra)
                )
            )
    except BaseException:
        for server in servers:
            server.stop()
        redis.stop()
        raise
    return Cluster(redis, servers, database_url)


def restart_on_same_port(server: ServerProcess, timeout: float = 30) -> ServerProcess:
    """Start the same instance again (same port, same environment) after it stopped."""
    assert server.process.poll() is not None, "stop the instance first"
    log_path = server.data_dir / f"server-{server.port}-{time.monotonic_ns()}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "chatservice.cli", "serve", "--port", str(server.port)],
            env=server.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    again = ServerProcess(
        server.base_url, server.port, server.data_dir, process, log_path, server.env
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"restarted server exited with {process.returncode}:\n{again.log()}")
        try:
            if httpx.get(f"{again.base_url}/readyz", timeout=1).status_code == 200:
                return again
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    again.stop()
    raise RuntimeError(f"restarted server did not become ready:\n{again.log()}")


class Person:
    """A fresh user with one SDK client per instance."""

    def __init__(self, cluster: Cluster, tokens: TokenCodec, prefix: str) -> None:
        self.id = new_user(prefix)
        self.token = tokens.issue(self.id)
        self.cluster = cluster
        self._clients: dict[str, ChatClient] = {}

    def on(self, server: ServerProcess | str) -> ChatClient:
        url = server if isinstance(server, str) else server.base_url
        if url not in self._clients:
            self._clients[url] = ChatClient(url, self.token)
        return self._clients[url]

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()


class People:
    def __init__(self, cluster: Cluster, tokens: TokenCodec) -> None:
        self.cluster = cluster
        self.tokens = tokens
        self.made: list[Person] = []

    def __call__(self, prefix: str = "user") -> Person:
        person = Person(self.cluster, self.tokens, prefix)
        self.made.append(person)
        return person

    async def group(self, *prefixes: str) -> tuple[list[Person], str]:
        """Fresh users and a group session they all belong to (created on instance A)."""
        people = [self(p) for p in prefixes]
        created = (
            await people[0]
            .on(self.cluster.a)
            .create_session(title="scale-out", participants=[p.id for p in people[1:]])
        )
        return people, str(created["session_id"])

    async def aclose(self) -> None:
        for person in self.made:
            await person.aclose()


# -- waiting --------------------------------------------------------------------------------


async def eventually(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool],
    timeout: float,
    what: str,
    interval: float = 0.05,
) -> float:
    """Poll `check` until it is true; return the seconds it took, fail after `timeout`."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return loop.time() - start
        if loop.time() - start > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(interval)


# -- recording clients ------------------------------------------------------------------------


class Recorder:
    """Reads every frame of one connection in a task and files them by type.

    Works over the SDK (`RealtimeConnection`, which repairs itself) or a raw `websockets`
    connection (which does not).
    """

    def __init__(self, name: str, conn: RealtimeConnection | ClientConnection) -> None:
        self.name = name
        self.conn = conn
        self.frames: list[JSON] = []
        self.closed: BaseException | None = None
        self.task = asyncio.create_task(self._run(), name=f"recorder-{name}")

    async def _next(self) -> JSON:
        if isinstance(self.conn, RealtimeConnection):
            return await self.conn.receive()
        return await recv_json(self.conn, timeout=3600)

    async def _run(self) -> None:
        try:
            while True:
                self.frames.append(await self._next())
        except (ConnectionClosed, WSClosed) as exc:
            self.closed = exc

    @property
    def messages(self) -> list[JSON]:
        return [f for f in self.frames if f.get("type") == "message"]

    @property
    def seqs(self) -> list[int]:
        return [int(f["seq"]) for f in self.messages]

    def of_type(self, kind: str) -> list[JSON]:
        return [f for f in self.frames if f.get("type") == kind]

    def system(self, event: str | None = None, user_id: str | None = None) -> list[JSON]:
        return [
            f
            for f in self.of_type("system")
            if (event is None or f.get("event") == event)
            and (user_id is None or f.get("user_id") == user_id)
        ]

    def errors(self) -> list[JSON]:
        return self.of_type("error")

    async def wait_seq(self, seq: int, timeout: float) -> None:
        def reached() -> bool:
            if self.task.done() and not (self.seqs and self.seqs[-1] >= seq):
                raise AssertionError(f"{self.name}: stream ended ({self.closed!r}) before {seq}")
            return bool(self.seqs) and max(self.seqs) >= seq

        try:
            await eventually(reached, timeout, f"{self.name} reaches seq {seq}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; got {self.seqs[-10:]} (of {len(self.seqs)})") from None

    async def wait_frame(
        self, match: Callable[[JSON], bool], timeout: float, what: str, start: int = 0
    ) -> JSON:
        found: list[JSON] = []

        def seen() -> bool:
            found[:] = [f for f in self.frames[start:] if match(f)]
            return bool(found)

        try:
            await eventually(seen, timeout, f"{self.name} gets {what}")
        except AssertionError as exc:
            tail = [f for f in self.frames if f.get("type") != "message"][-8:]
            raise AssertionError(f"{exc}; non-message frames: {tail}") from None
        return found[0]

    async def barrier(self, timeout: float = 5.0) -> None:
        """Ping and wait for the pong: everything queued for us before it has arrived."""
        before = len(self.of_type("pong"))
        if isinstance(self.conn, RealtimeConnection):
            await self.conn.ping()
        else:
            await self.conn.send(json.dumps({"type": "ping"}))
        await eventually(
            lambda: len(self.of_type("pong")) > before, timeout, f"{self.name} gets a pong"
        )

    async def stop(self) -> None:
        if not self.task.done():
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        try:
            await asyncio.wait_for(self.conn.close(), 5)
        except (TimeoutError, ConnectionClosed, WSClosed, OSError):
            pass


async def wait_all(recorders: Iterable[Recorder], seq: int, timeout: float) -> None:
    """Every recorder reaches `seq`; on failure, say where each one stands."""
    recorders = list(recorders)

    def reached() -> bool:
        return all(r.seqs and max(r.seqs) >= seq for r in recorders)

    try:
        await eventually(reached, timeout, f"every client reaches seq {seq}")
    except AssertionError as exc:
        state = [
            f"{r.name}: {len(r.seqs)} msgs, last {r.seqs[-3:]}, missing "
            f"{sorted(set(range(1, seq + 1)) - set(r.seqs))[:12]}, ended={r.closed!r}"
            for r in recorders
        ]
        raise AssertionError(f"{exc}:\n" + "\n".join(state)) from None


async def stop_all(recorders: Iterable[Recorder]) -> None:
    await asyncio.gather(*(r.stop() for r in recorders))


def message_keys(messages: Iterable[JSON]) -> list[tuple[int, str, str]]:
    return [(int(m["seq"]), str(m["message_id"]), str(m["content"])) for m in messages]


def assert_complete(recorder: Recorder, history: list[JSON], after: int = 0) -> None:
    """The recorder got exactly the stored messages after `after`, once each, in order."""
    expected = message_keys(m for m in history if int(m["seq"]) > after)
    got = message_keys(recorder.messages)
    if got != expected:
        seqs = [k[0] for k in got]
        dups = sorted({s for s in seqs if seqs.count(s) > 1})
        missing = sorted({k[0] for k in expected} - set(seqs))
        out_of_order = [b for a, b in pairwise(seqs) if b <= a]
        raise AssertionError(
            f"{recorder.name}: {len(got)} messages vs {len(expected)} stored; "
            f"missing {missing[:20]}, duplicated {dups[:20]}, out of order at {out_of_order[:20]}"
        )


# -- Redis ----------------------------------------------------------------------------------


async def numsub(redis_url: str, channel: str) -> int:
    client = Redis.from_url(redis_url)
    try:
        [(_, count)] = await client.pubsub_numsub(channel)
        return int(count)
    finally:
        await client.aclose()


def unhandled_errors(log: str) -> list[str]:
    """ERROR lines and logged tracebacks of a server log, one summary line each."""
    found = []
    for line in log.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            if "Traceback" in line:
                found.append(line[:300])
            continue
        if record.get("level") in ("ERROR", "CRITICAL") or "exception" in record:
            error = str(record.get("exception", "")).strip().splitlines()
            found.append(f"{record.get('message', '')[:200]} | {error[-1] if error else ''}")
    return found


def ws_address(base_url: str, session_id: str, token: str, **params: Any) -> str:
    base = base_url.replace("http://", "ws://", 1)
    return f"{base}/ws/{session_id}?{urlencode({'token': token, **params})}"
