"""Agent answers across two real instances on one Redis and one PostgreSQL.

The built-in demo agent (id 1) is slowed down (STREAM_CHUNK_SIZE / STREAM_DELAY_MS) so an
answer streams for a few seconds: long enough to drop a client mid-answer and resume it on
the other instance (WebSocket `since_seq`, SSE `from_index`), to cancel from a device on
the other instance, and to send a second question while the first is being answered.

Clients are plain `websockets` and `httpx` (the protocol as third parties see it), plus
the SDK where it repairs a dropped connection by itself. Every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
import websockets
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed as WSClosed

from chatservice.auth import TokenCodec
from chatservice.client import RealtimeConnection
from tests.conftest import RedisProcess, ServerProcess, new_user, start_redis, start_server

JSON = dict[str, Any]

DEMO_AGENT = 1
CHUNK = 3  # characters per chunk
DELAY_MS = 40  # between chunks: a demo answer (~250 characters) streams for ~3.5 s
ANSWER_TIMEOUT = 20.0  # a whole answer, with generous slack
CANCEL_BOUND = 2.0  # seconds from the cancel request to stream_end at every client
QUIET = 0.6  # after stream_end, how long we watch for stray chunks (15 chunk intervals)
STREAM_FRAMES = ("stream_start", "stream_chunk", "stream_end")
ENDING = "before this one."  # the demo answer's last words


# -- the cluster ------------------------------------------------------------------------------


class Cluster:
    def __init__(self, base: Path, database_url: str) -> None:
        self.base = base
        self.database_url = database_url
        self.redis: RedisProcess = start_redis(base / "redis")
        self.servers: list[ServerProcess] = []
        try:
            self.a = self.start("a")
            self.b = self.start("b")
        except BaseException:
            self.stop()
            raise

    def start(self, name: str, **env: Any) -> ServerProcess:
        settings = {"STREAM_CHUNK_SIZE": CHUNK, "STREAM_DELAY_MS": DELAY_MS, **env}
        server = start_server(
            self.base / f"instance-{name}", self.database_url, REDIS_URL=self.redis.url, **settings
        )
        self.servers.append(server)
        return server

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
        self.redis.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {s.base_url}\n{s.log()[-3000:]}" for s in self.servers)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, postgres_url: str) -> Iterator[Cluster]:
    made = Cluster(tmp_path_factory.mktemp("agents-scaleout"), postgres_url)
    yield made
    made.stop()


class User:
    def __init__(self, tokens: TokenCodec, prefix: str) -> None:
        self.id = new_user(prefix)
        self.token = tokens.issue(self.id)
        self._clients: list[httpx.AsyncClient] = []

    def http(self, server: ServerProcess) -> httpx.AsyncClient:
        client = httpx.AsyncClient(
            base_url=server.base_url,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=10,
        )
        self._clients.append(client)
        return client

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()


@pytest.fixture
async def make_user(tokens: TokenCodec) -> AsyncIterator[Callable[[str], User]]:
    made: list[User] = []

    def make(prefix: str = "user") -> User:
        user = User(tokens, prefix)
        made.append(user)
        return user

    yield make
    for user in made:
        await user.aclose()


async def agent_session(user: User, server: ServerProcess) -> str:
    created = await user.http(server).post(
        "/api/chat/sessions", json={"kind": "agent", "agent_id": DEMO_AGENT, "title": "scale"}
    )
    assert created.status_code == 201, created.text
    return str(created.json()["session_id"])


async def ask(user: User, server: ServerProcess, sid: str, content: str) -> JSON:
    sent = await user.http(server).post(
        f"/api/chat/sessions/{sid}/messages", json={"content": content}
    )
    assert sent.status_code == 201, sent.text
    body: JSON = sent.json()
    return body


async def history(user: User, server: ServerProcess, sid: str) -> list[JSON]:
    page = await user.http(server).get(f"/api/chat/sessions/{sid}/messages", params={"limit": 100})
    assert page.status_code == 200, page.text
    return sorted(page.json()["messages"], key=lambda m: int(m["seq"]))


async def stored(user: User, server: ServerProcess, sid: str, message_id: str) -> JSON:
    for message in await history(user, server, sid):
        if message["message_id"] == message_id:
            return message
    raise AssertionError(f"{message_id} is not stored in {sid}")


# -- WebSocket watchers -------------------------------------------------------------------------


class Watcher:
    """A raw WebSocket whose frames a task records, each with its arrival time."""

    def __init__(self, name: str, ws: ClientConnection) -> None:
        self.name = name
        self.ws = ws
        self.timed: list[tuple[float, JSON]] = []
        self.closed: BaseException | None = None
        self.task = asyncio.create_task(self._run(), name=f"watcher-{name}")

    @classmethod
    async def open(
        cls, name: str, server: ServerProcess, sid: str, token: str, **params: Any
    ) -> Watcher:
        query = urlencode({"token": token, **params})
        ws = await websockets.connect(f"{server.ws_url}/ws/{sid}?{query}", max_queue=None)
        watcher = cls(name, ws)
        await watcher.wait(lambda f: f.get("type") == "connected", 5, "connected")
        return watcher

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            async for raw in self.ws:
                frame = json.loads(raw)
                self.timed.append((loop.time(), frame))
        except WSClosed as exc:
            self.closed = exc
        except Exception as exc:  # recorded, and shown by the waits
            self.closed = exc

    @property
    def frames(self) -> list[JSON]:
        return [f for _, f in self.timed]

    def stream(self, message_id: str) -> list[JSON]:
        return [
            f
            for f in self.frames
            if f.get("type") in STREAM_FRAMES and f.get("message_id") == message_id
        ]

    def chunks(self, message_id: str) -> list[JSON]:
        return [f for f in self.stream(message_id) if f["type"] == "stream_chunk"]

    async def wait(
        self, match: Callable[[JSON], bool], timeout: float, what: str
    ) -> tuple[float, JSON]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for at, frame in self.timed:
                if match(frame):
                    return at, frame
            if self.task.done():
                raise AssertionError(f"{self.name}: closed ({self.closed!r}) before {what}")
            if loop.time() > deadline:
                tail = [f.get("type") for f in self.frames[-10:]]
                raise AssertionError(f"{self.name}: no {what} within {timeout}s; last {tail}")
            await asyncio.sleep(0.01)

    async def wait_start(self, reply_to: str, timeout: float = 10) -> JSON:
        _, frame = await self.wait(
            lambda f: f.get("type") == "stream_start" and f.get("reply_to") == reply_to,
            timeout,
            f"stream_start replying to {reply_to}",
        )
        return frame

    async def wait_chunks(self, message_id: str, count: int, timeout: float = 10) -> None:
        await self.wait(
            lambda f: (
                f.get("type") == "stream_chunk"
                and f.get("message_id") == message_id
                and int(f["index"]) >= count - 1
            ),
            timeout,
            f"chunk {count - 1} of {message_id}",
        )

    async def wait_end(
        self, message_id: str, timeout: float = ANSWER_TIMEOUT
    ) -> tuple[float, JSON]:
        return await self.wait(
            lambda f: f.get("type") == "stream_end" and f.get("message_id") == message_id,
            timeout,
            f"stream_end of {message_id}",
        )

    async def barrier(self, timeout: float = 5) -> None:
        """Ping and wait for the pong: everything queued for us before it has arrived."""
        before = sum(1 for f in self.frames if f.get("type") == "pong")
        await self.ws.send(json.dumps({"type": "ping"}))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while sum(1 for f in self.frames if f.get("type") == "pong") <= before:
            assert loop.time() < deadline, f"{self.name}: no pong within {timeout}s"
            assert not self.task.done(), f"{self.name}: closed ({self.closed!r})"
            await asyncio.sleep(0.01)

    def drop(self) -> None:
        """The network goes away: no close handshake, the server just loses the socket."""
        transport = self.ws.transport
        assert transport is not None
        transport.abort()

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.ws.close(), 5)
        except (TimeoutError, WSClosed, OSError):
            pass
        if not self.task.done():
            self.task.cancel()
        try:
            await asyncio.wait_for(self.task, 5)
        except (asyncio.CancelledError, TimeoutError):
            pass


@pytest.fixture
async def watchers() -> AsyncIterator[list[Watcher]]:
    """Watchers appended here are closed after the test, whatever happened."""
    made: list[Watcher] = []
    yield made
    await asyncio.gather(*(w.close() for w in made))


async def watch(
    made: list[Watcher], name: str, server: ServerProcess, sid: str, token: str, **params: Any
) -> Watcher:
    watcher = await Watcher.open(name, server, sid, token, **params)
    made.append(watcher)
    return watcher


# -- SSE ----------------------------------------------------------------------------------------


class SSE:
    """The `data:` events of one open SSE response, as dicts."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.events: list[JSON] = []
        self._lines = response.aiter_lines()

    async def next(self, timeout: float = 10) -> JSON | None:
        """The next event; None when the response ends."""
        async with asyncio.timeout(timeout):
            async for line in self._lines:
                if line.startswith("data:"):
                    event = json.loads(line[5:].strip())
                    self.events.append(event)
                    return event
        return None

    async def rest(self, timeout: float = ANSWER_TIMEOUT) -> list[JSON]:
        """Every event until the response ends."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        got = []
        while (event := await self.next(max(0.01, deadline - loop.time()))) is not None:
            got.append(event)
        return got


@asynccontextmanager
async def sse(
    client: httpx.AsyncClient, method: str, path: str, **kwargs: Any
) -> AsyncIterator[SSE]:
    async with client.stream(method, path, timeout=httpx.Timeout(10, read=30), **kwargs) as resp:
        assert resp.status_code == 200, (resp.status_code, (await resp.aread())[:500])
        assert resp.headers["content-type"].startswith("text/event-stream")
        yield SSE(resp)


async def resume_events(client: httpx.AsyncClient, message_id: str, **params: Any) -> list[JSON]:
    async with sse(client, "GET", f"/api/chat/streams/{message_id}", params=params) as events:
        return await events.rest()


# -- checks -------------------------------------------------------------------------------------


def whole_stream(frames: list[JSON], message_id: str, first: int = 0) -> tuple[list[str], JSON]:
    """One answer's frames, as one connection got them: stream_start, chunks `first`,
    `first`+1, … without gap or duplicate, one stream_end, nothing after it.
    Returns the chunk texts and the stream_end."""
    mine = [f for f in frames if f.get("type") in STREAM_FRAMES and f["message_id"] == message_id]
    shape = [
        "start"
        if f["type"] == "stream_start"
        else "end"
        if f["type"] == "stream_end"
        else f["index"]
        for f in mine
    ]
    expected = ["start", *range(first, first + len(mine) - 2), "end"]
    assert shape == expected, f"{message_id}: got {shape}, expected {expected}"
    return [str(f["content"]) for f in mine[1:-1]], mine[-1]


def assert_complete_answer(message: JSON, question: str, chunks: int | None = None) -> None:
    """A stored demo answer, whole: its text, status and chunk count."""
    content = str(message["content"])
    assert message["message_type"] == "stream", message
    assert message["sender_type"] == "agent", message
    assert f'You said: "{question}"' in content, content
    assert content.endswith(ENDING), content
    meta = message["metadata"] or {}
    assert meta.get("status") == "completed", meta
    assert meta.get("chunks") == math.ceil(len(content) / CHUNK), (meta, len(content))
    if chunks is not None:
        assert meta.get("chunks") == chunks, meta


async def assert_resume_returns_the_stored_message(
    user: User, servers: list[ServerProcess], message: JSON
) -> None:
    for server in servers:
        for params in ({}, {"from_index": 5}):
            events = await resume_events(user.http(server), str(message["message_id"]), **params)
            assert len(events) == 1, (server.base_url, params, events)
            [event] = events
            assert event["type"] == "message", event
            for key in ("message_id", "seq", "content", "message_type", "metadata"):
                assert event[key] == message[key], (key, event[key], message[key])


# -- tests ----------------------------------------------------------------------------------------


async def test_two_devices_on_two_instances_receive_the_whole_answer(
    cluster: Cluster, make_user: Callable[[str], User], watchers: list[Watcher]
) -> None:
    alice = make_user("alice")
    sid = await agent_session(alice, cluster.a)
    phone = await watch(watchers, "phone@A", cluster.a, sid, alice.token)
    laptop = await watch(watchers, "laptop@B", cluster.b, sid, alice.token)
    question = await ask(alice, cluster.a, sid, "hello from two devices")

    start = await phone.wait_start(question["message_id"])
    mid = str(start["message_id"])
    await phone.wait_end(mid)
    await laptop.wait_end(mid)
    await phone.barrier()
    await laptop.barrier()

    texts, end = whole_stream(phone.frames, mid)
    assert whole_stream(laptop.frames, mid) == (texts, end)
    assert phone.stream(mid) == laptop.stream(mid)  # the same frames, byte for byte
    assert end["status"] == "completed", end
    assert end["chunks"] == len(texts) > 20, end
    assert isinstance(end["seq"], int) and end["seq"] > question["seq"], end
    assert end["tokens_used"] and end["latency_ms"] > 0, end

    message = await stored(alice, cluster.b, sid, mid)
    assert message["content"] == "".join(texts)
    assert message["seq"] == end["seq"]
    assert_complete_answer(message, "hello from two devices", len(texts))
    # Stored once: the question and one answer, no chunk rows.
    assert [m["message_id"] for m in await history(alice, cluster.a, sid)] == [
        question["message_id"],
        mid,
    ]
    await assert_resume_returns_the_stored_message(alice, [cluster.a, cluster.b], message)


async def test_ws_client_dropped_on_a_resumes_on_b_with_since_seq(
    cluster: Cluster, make_user: Callable[[str], User], watchers: list[Watcher]
) -> None:
    bob = make_user("bob")
    sid = await agent_session(bob, cluster.a)
    on_a = await watch(watchers, "bob@A", cluster.a, sid, bob.token)
    await on_a.ws.send(
        json.dumps({"type": "message", "content": "resume me on B", "client_msg_id": "q1"})
    )
    _, question = await on_a.wait(lambda f: f.get("type") == "message", 5, "the question")
    start = await on_a.wait_start(question["message_id"])
    mid = str(start["message_id"])
    await on_a.wait_chunks(mid, 8)
    on_a.drop()
    await asyncio.sleep(0.05)
    before = on_a.chunks(mid)  # what the client had when its connection died
    assert before and not on_a.stream(mid)[-1]["type"] == "stream_end"
    last_index = int(before[-1]["index"])
    assert [int(c["index"]) for c in before] == list(range(last_index + 1))
    await asyncio.sleep(0.3)  # chunks go by that this client never gets on A

    on_b = await watch(watchers, "bob@B", cluster.b, sid, bob.token, since_seq=question["seq"])
    connected_at, connected = on_b.timed[0]
    assert connected["type"] == "connected" and connected["since_seq"] == question["seq"]
    end_at, end = await on_b.wait_end(mid)
    await on_b.barrier()

    # The new connection: the answer's start, every chunk once in index order (those the
    # client had, those it missed, then the live ones), one end; no replayed message.
    texts, end = whole_stream(on_b.frames, mid)
    assert [f for f in on_b.frames if f.get("type") == "message"] == []
    assert end["status"] == "completed" and end["chunks"] == len(texts), end
    assert texts[: last_index + 1] == [c["content"] for c in before]
    assert len(texts) > last_index + 1, "nothing was missing: the drop came too late"
    # The client keeps what it had and takes the rest: the whole answer, once.
    merged = [c["content"] for c in before] + texts[last_index + 1 :]
    message = await stored(bob, cluster.a, sid, mid)
    assert "".join(merged) == message["content"]
    assert_complete_answer(message, "resume me on B", len(texts))
    # It was still streaming when B took over: some chunks came live, after the catch-up.
    assert end_at - connected_at > 0.3, f"the answer ended {end_at - connected_at:.2f}s in"


async def test_sdk_client_resumes_on_b_after_its_instance_dies_mid_answer(
    cluster: Cluster, make_user: Callable[[str], User], watchers: list[Watcher]
) -> None:
    """The SDK repairs the connection itself (next address, `since_seq`); its caller must
    see one answer: each chunk once, in order, then the end."""
    carol = make_user("carol")
    sid = await agent_session(carol, cluster.a)
    doomed = cluster.start("doomed")
    witness = await watch(watchers, "witness@A", cluster.a, sid, carol.token)
    live = await RealtimeConnection(
        [doomed.base_url, cluster.b.base_url], sid, carol.token
    ).connect()
    got: list[JSON] = []

    async def read_until_end(message_id: list[str]) -> None:
        while True:
            frame = await live.receive(timeout=ANSWER_TIMEOUT)
            got.append(frame)
            if frame.get("type") == "stream_end" and frame.get("message_id") in message_id:
                return

    try:
        assert (await live.receive(timeout=5))["type"] == "connected"
        question = await ask(carol, cluster.a, sid, "survive a crash")
        start = await witness.wait_start(question["message_id"])
        mid = str(start["message_id"])
        reader = asyncio.create_task(read_until_end([mid]))
        await witness.wait_chunks(mid, 8)
        doomed.process.kill()  # SIGKILL: the SDK's instance vanishes mid-answer
        doomed.process.wait(5)
        await asyncio.wait_for(reader, ANSWER_TIMEOUT)
    finally:
        doomed.stop()
        await live.close()
    assert live.reconnects >= 1
    assert live.base_url == cluster.b.base_url
    texts, end = whole_stream(got, mid)
    assert end["status"] == "completed"
    message = await stored(carol, cluster.b, sid, mid)
    assert "".join(texts) == message["content"]
    assert_complete_answer(message, "survive a crash", len(texts))


async def test_sse_client_dropped_on_a_resumes_on_b_from_index(
    cluster: Cluster, make_user: Callable[[str], User], watchers: list[Watcher]
) -> None:
    dora = make_user("dora")
    sid = await agent_session(dora, cluster.a)
    witness = await watch(watchers, "witness@B", cluster.b, sid, dora.token)
    async with sse(
        dora.http(cluster.a),
        "POST",
        f"/api/chat/sessions/{sid}/messages/stream",
        json={"content": "stream me over SSE"},
    ) as events:
        start = await events.next()
        assert start is not None and start["type"] == "stream_start", start
        mid = str(start["message_id"])
        had: list[JSON] = []
        while len(had) < 10:
            event = await events.next()
            assert event is not None and event["type"] == "stream_chunk", event
            had.append(event)
    # The response is gone (the client dropped it); the answer goes on without it.
    assert [int(e["index"]) for e in had] == list(range(10))
    await asyncio.sleep(0.3)

    async with sse(
        dora.http(cluster.b), "GET", f"/api/chat/streams/{mid}", params={"from_index": 10}
    ) as resumed:
        rest = await resumed.rest()
    texts, end = whole_stream(rest, mid, first=10)  # exactly the missing ones, then live
    assert end["status"] == "completed" and end["chunks"] == 10 + len(texts), end
    message = await stored(dora, cluster.a, sid, mid)
    assert "".join(e["content"] for e in had) + "".join(texts) == message["content"]
    assert_complete_answer(message, "stream me over SSE")
    # Every other device saw the same answer.
    await witness.barrier()
    seen, seen_end = whole_stream(witness.frames, mid)
    assert seen == [e["content"] for e in had] + texts
    assert seen_end == end
    await assert_resume_returns_the_stored_message(dora, [cluster.a, cluster.b], message)


async def check_cancelled(
    user: User,
    cluster: Cluster,
    sid: str,
    mid: str,
    devices: list[Watcher],
    requested_at: float,
    how: str,
) -> None:
    """stream_end "cancelled" reaches every device in time, nothing follows it, and the
    partial answer is stored as cancelled."""
    ends = [await device.wait_end(mid, CANCEL_BOUND + 3) for device in devices]
    latencies = {d.name: at - requested_at for d, (at, _) in zip(devices, ends, strict=True)}
    print(
        f"cancel latency ({how}): "
        + ", ".join(f"{n} {s * 1000:.0f} ms" for n, s in latencies.items())
    )
    await asyncio.sleep(QUIET)  # a chunk still in flight would show up by now
    for device in devices:
        await device.barrier()
    first_texts, first_end = whole_stream(devices[0].frames, mid)
    for device in devices:
        texts, end = whole_stream(device.frames, mid)  # also: nothing after stream_end
        assert (texts, end) == (first_texts, first_end), device.name
    assert first_end["status"] == "cancelled", first_end
    assert first_end["chunks"] == len(first_texts), first_end
    assert max(latencies.values()) < CANCEL_BOUND, latencies

    message = await stored(user, cluster.b, sid, mid)
    meta = message["metadata"] or {}
    assert meta.get("status") == "cancelled", meta
    assert meta.get("chunks") == len(first_texts), meta
    assert message["content"] == "".join(first_texts)
    assert message["content"] and not message["content"].endswith(ENDING), message["content"]
    assert message["seq"] == first_end["seq"]
    await assert_resume_returns_the_stored_message(user, [cluster.a, cluster.b], message)
    # Cancelling what has ended says so, and changes nothing.
    again = await user.http(cluster.b).post(f"/api/chat/streams/{mid}/cancel")
    assert again.status_code == 200, again.text
    assert again.json() == {"message_id": mid, "status": "cancelled"}
    # The session goes on: the next question gets a whole answer.
    follow = await ask(user, cluster.b, sid, "after the cancel")
    start = await devices[0].wait_start(follow["message_id"])
    await devices[0].wait_end(str(start["message_id"]))
    answer = await stored(user, cluster.a, sid, str(start["message_id"]))
    assert_complete_answer(answer, "after the cancel")


async def test_rest_cancel_on_b_stops_the_answer_running_on_a(
    cluster: Cluster, make_user: Callable[[str], User], watchers: list[Watcher]
) -> None:
    erin, mallory = make_user("erin"), make_user("mallory")
    sid = await agent_session(erin, cluster.a)
    phone = await watch(watchers, "erin-phone@A", cluster.a, sid, erin.token)
    laptop = await watch(watchers, "erin-laptop@B", cluster.b, sid, erin.token)
    question = await ask(erin, cluster.a, sid, "cancel me over REST")  # answered on A
    start = await phone.wait_start(question["message_id"])
    mid = str(start["message_id"])
    await laptop.wait_chunks(mid, 6)

    # Only participants may cancel; a stranger's attempt leaves the answer running.
    stranger = await mallory.http(cluster.b).post(f"/api/chat/streams/{mid}/cancel")
    assert stranger.status_code in (403, 404), stranger.text
    await asyncio.sleep(0.2)
    assert [f["type"] for f in phone.stream(mid)].count("stream_end") == 0

    loop = asyncio.get_running_loop()
    requested_at = loop.time()
    cancelled = await erin.http(cluster.b).post(f"/api/chat/streams/{mid}/cancel")
    assert cancelled.status_code == 202, cancelled.text
    assert cancelled.json() == {"message_id": mid, "status": "cancelling"}
    await check_cancelled(erin, cluster, sid, mid, [phone, laptop], requested_at, "REST on B")


async def test_ws_cancel_frame_on_b_stops_the_answer_running_on_a(
    cluster: Cluster, make_user: Callable[[str], User], watchers: list[Watcher]
) -> None:
    fred = make_user("fred")
    sid = await agent_session(fred, cluster.a)
    phone = await watch(watchers, "fred-phone@A", cluster.a, sid, fred.token)
    laptop = await watch(watchers, "fred-laptop@B", cluster.b, sid, fred.token)
    question = await ask(fred, cluster.a, sid, "cancel me over WebSocket")  # answered on A
    start = await laptop.wait_start(question["message_id"])
    mid = str(start["message_id"])
    await laptop.wait_chunks(mid, 6)

    requested_at = asyncio.get_running_loop().time()
    await laptop.ws.send(json.dumps({"type": "cancel", "message_id": mid}))
    await check_cancelled(fred, cluster, sid, mid, [phone, laptop], requested_at, "WS frame on B")
    assert [f for f in laptop.frames if f.get("type") == "error"] == []


async def test_a_second_question_on_b_is_answered_after_the_first(
    cluster: Cluster, make_user: Callable[[str], User], watchers: list[Watcher]
) -> None:
    gina = make_user("gina")
    sid = await agent_session(gina, cluster.a)
    on_a = await watch(watchers, "gina@A", cluster.a, sid, gina.token)
    on_b = await watch(watchers, "gina@B", cluster.b, sid, gina.token)
    first = await ask(gina, cluster.a, sid, "first question")
    start1 = await on_b.wait_start(first["message_id"])
    await on_b.wait_chunks(str(start1["message_id"]), 3)
    second = await ask(gina, cluster.b, sid, "second question")  # while A answers the first
    start2 = await on_a.wait_start(second["message_id"], ANSWER_TIMEOUT)
    mid1, mid2 = str(start1["message_id"]), str(start2["message_id"])
    assert mid1 != mid2
    for device in (on_a, on_b):
        await device.wait_end(mid2)
    await asyncio.sleep(1.5)  # a duplicate answer (a second worker polling) would start now
    for device in (on_a, on_b):
        await device.barrier()
        stream = [f for f in device.frames if f.get("type") in STREAM_FRAMES]
        order = [f["message_id"] for f in stream]
        # One whole answer, then the other: never interleaved, and no third answer.
        assert order == [mid1] * order.count(mid1) + [mid2] * order.count(mid2), device.name
        for mid in (mid1, mid2):
            _, end = whole_stream(device.frames, mid)
            assert end["status"] == "completed", end

    messages = await history(gina, cluster.b, sid)
    kinds = [(m["sender_type"], m["message_id"]) for m in messages]
    assert kinds == [
        ("user", first["message_id"]),
        ("user", second["message_id"]),
        ("agent", mid1),
        ("agent", mid2),
    ], kinds
    answer1, answer2 = messages[2], messages[3]
    assert answer1["metadata"]["reply_to"] == first["message_id"]
    assert answer2["metadata"]["reply_to"] == second["message_id"]
    assert_complete_answer(answer1, "first question")
    assert_complete_answer(answer2, "second question")


async def test_a_client_that_disconnects_does_not_stop_the_answer(
    cluster: Cluster, make_user: Callable[[str], User], watchers: list[Watcher]
) -> None:
    hank = make_user("hank")
    sid = await agent_session(hank, cluster.a)
    only = await watch(watchers, "hank@A", cluster.a, sid, hank.token)
    await only.ws.send(
        json.dumps({"type": "message", "content": "nobody is watching", "client_msg_id": "q"})
    )
    _, question = await only.wait(lambda f: f.get("type") == "message", 5, "the question")
    start = await only.wait_start(question["message_id"])
    mid = str(start["message_id"])
    await only.wait_chunks(mid, 3)
    only.drop()  # the only client goes away mid-answer, without a word

    loop = asyncio.get_running_loop()
    deadline = loop.time() + ANSWER_TIMEOUT
    while True:
        found = [m for m in await history(hank, cluster.b, sid) if m["message_id"] == mid]
        if found:
            break
        assert loop.time() < deadline, "the answer was never stored"
        await asyncio.sleep(0.2)
    assert_complete_answer(found[0], "nobody is watching")
    await assert_resume_returns_the_stored_message(hank, [cluster.a, cluster.b], found[0])


async def test_resume_returns_the_stored_answer_when_the_buffer_was_lost(
    cluster: Cluster, make_user: Callable[[str], User], watchers: list[Watcher]
) -> None:
    """Redis runs without persistence: a restart (or eviction) mid-answer loses the
    answer's buffer. Once the answer ends, resuming it must still give the stored message."""
    ivy = make_user("ivy")
    sid = await agent_session(ivy, cluster.a)
    on_b = await watch(watchers, "ivy@B", cluster.b, sid, ivy.token)
    question = await ask(ivy, cluster.a, sid, "lose my buffer")
    start = await on_b.wait_start(question["message_id"])
    mid = str(start["message_id"])
    await on_b.wait_chunks(mid, 3)
    redis = Redis.from_url(cluster.redis.url)
    try:
        await redis.delete(f"chat:stream:{mid}", f"chat:stream:{mid}:chunks")
    finally:
        await redis.aclose()
    await on_b.wait_end(mid)
    message = await stored(ivy, cluster.a, sid, mid)
    assert (message["metadata"] or {}).get("status") == "completed"
    await assert_resume_returns_the_stored_message(ivy, [cluster.a, cluster.b], message)


# -- an instance that streams without pauses ------------------------------------------------------
#
# One-character chunks and no delay: the instance spends all its time appending chunks to
# the Redis buffer and publishing them, so a cancel lands in the middle of those calls
# rather than in the demo agent's sleep, as it would with a fast upstream model.

FAST_QUESTION = 3000  # characters: the answer repeats it, ~3200 chunks in all
FAST_CANCEL_AT = 300  # chunks in the buffer when the cancel is sent
FAST_ROUNDS = 6


@pytest.fixture(scope="module")
def fast(cluster: Cluster) -> Iterator[ServerProcess]:
    # A deep send queue: ~3,200 chunks at full speed to a test client that may lag on a
    # busy machine; this server's tests are about what is stored, not slow consumers.
    server = cluster.start("fast", STREAM_CHUNK_SIZE=1, STREAM_DELAY_MS=0, WS_SEND_QUEUE_SIZE=8192)
    yield server
    server.stop()


@pytest.fixture
async def cluster_redis(cluster: Cluster) -> AsyncIterator[Redis]:
    client = Redis.from_url(cluster.redis.url)
    yield client
    await client.aclose()


async def fast_answer_started(redis: Redis, watcher: Watcher, question: JSON) -> str:
    """The answer's id, once its buffer holds FAST_CANCEL_AT chunks (the buffer is the
    clock: a client may lag behind a producer this fast)."""
    start = await watcher.wait_start(question["message_id"], ANSWER_TIMEOUT)
    mid = str(start["message_id"])
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while await redis.llen(f"chat:stream:{mid}:chunks") < FAST_CANCEL_AT:
        assert loop.time() < deadline, f"the fast answer never reached {FAST_CANCEL_AT} chunks"
        await asyncio.sleep(0.002)
    return mid


async def buffer_status_after(redis: Redis, mid: str, timeout: float) -> tuple[str, float]:
    """The answer's final status in the buffer and the seconds it took to get there."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while True:
        status = await redis.hget(f"chat:stream:{mid}", "status")
        if status is not None and status != b"streaming":
            return status.decode(), loop.time() - started
        assert loop.time() - started < timeout, f"{mid} still streaming after {timeout}s"
        await asyncio.sleep(0.005)


async def test_cancel_stops_an_answer_that_streams_without_pauses(
    cluster: Cluster,
    fast: ServerProcess,
    cluster_redis: Redis,
    make_user: Callable[[str], User],
    watchers: list[Watcher],
) -> None:
    """Every cancel must stop the answer, wherever in the generation loop it lands."""
    kim = make_user("kim")
    sid = await agent_session(kim, fast)
    on_b = await watch(watchers, "kim@B", cluster.b, sid, kim.token)
    for round_ in range(FAST_ROUNDS):
        question = await ask(kim, fast, sid, f"round {round_} " + "x" * FAST_QUESTION)
        mid = await fast_answer_started(cluster_redis, on_b, question)
        cancelled = await kim.http(cluster.b).post(f"/api/chat/streams/{mid}/cancel")
        assert cancelled.status_code == 202, cancelled.text
        status, took = await buffer_status_after(cluster_redis, mid, ANSWER_TIMEOUT)
        chunks = await cluster_redis.llen(f"chat:stream:{mid}:chunks")
        print(
            f"round {round_}: {status} after {chunks} chunks, {took * 1000:.0f} ms after the cancel"
        )
        assert (status, took < CANCEL_BOUND) == ("cancelled", True), (
            f"round {round_}: the cancel did not stop the answer: it ended {status!r} "
            f"{took:.2f}s after the cancel, with {chunks} chunks"
        )
        _, end = await on_b.wait_end(mid, CANCEL_BOUND + 3)
        assert end["status"] == "cancelled", end


async def test_a_cancelled_answer_stores_exactly_the_chunks_that_were_sent(
    cluster: Cluster,
    fast: ServerProcess,
    cluster_redis: Redis,
    make_user: Callable[[str], User],
    watchers: list[Watcher],
) -> None:
    """Whatever the moment of the cancel, the stored partial answer and stream_end's
    `chunks` are exactly what the devices received: no chunk stored that nobody got."""
    lena = make_user("lena")
    sid = await agent_session(lena, fast)
    on_b = await watch(watchers, "lena@B", cluster.b, sid, lena.token)
    statuses: list[str] = []
    # Rounds whose cancel was lost (see the test above) complete, and prove little here:
    # go on until three cancels took effect.
    for round_ in range(10):
        if statuses.count("cancelled") >= 3:
            break
        question = await ask(lena, fast, sid, f"round {round_} " + "x" * FAST_QUESTION)
        mid = await fast_answer_started(cluster_redis, on_b, question)
        cancelled = await lena.http(cluster.b).post(f"/api/chat/streams/{mid}/cancel")
        assert cancelled.status_code == 202, cancelled.text
        await on_b.wait_end(mid, ANSWER_TIMEOUT)
        await on_b.barrier()
        texts, end = whole_stream(on_b.frames, mid)
        statuses.append(end["status"])
        message = await stored(lena, cluster.b, sid, mid)
        meta = message["metadata"] or {}
        assert meta.get("status") == end["status"], (meta, end)
        got = (end["chunks"], meta.get("chunks"), message["content"])
        assert got == (len(texts), len(texts), "".join(texts)), (
            f"round {round_} ({end['status']}): the devices got {len(texts)} chunks "
            f"({len(''.join(texts))} characters); stream_end says {end['chunks']}, the stored "
            f"answer has {meta.get('chunks')} chunks and {len(message['content'])} characters"
        )
    assert "cancelled" in statuses, f"no cancel took effect: {statuses}"
