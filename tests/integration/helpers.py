"""Small helpers shared by the integration tests (no fixtures here, see conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import orjson
import uvicorn
from starlette.types import ASGIApp

from chatservice import events
from chatservice.api.direct_frames import DirectFramesProtocol
from chatservice.api.header_limit import bounded_http_protocol
from chatservice.components import Components
from chatservice.domain import Message, NewSession, Principal, new_id, utcnow
from chatservice.envelope import Envelope
from chatservice.realtime.connection import Connection, Subscription
from chatservice.realtime.hub import Hub
from chatservice.realtime.sink import AwaitingSink
from chatservice.services.messages import Draft
from tests.conftest import new_user


def as_utc(moment: datetime | None) -> datetime | None:
    """Times read back from SQLite are naive UTC; from PostgreSQL aware. Compare as aware."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def users(count: int, prefix: str = "user") -> list[Principal]:
    return [Principal(new_user(prefix)) for _ in range(count)]


async def group(
    parts: Components, owner: Principal, *members: Principal, title: str | None = None
) -> str:
    """A group session owned by `owner` with `members`; returns its id."""
    detail, created = await parts.sessions.create(
        owner,
        NewSession(kind="group", title=title, participants=[m.user_id for m in members]),
    )
    assert created
    return detail.session.session_id


async def send(parts: Components, who: Principal, session_id: str, content: str, **kw: Any) -> int:
    """Send a text message; returns its seq."""
    result = await parts.messages.send(who, session_id, Draft(content=content, **kw))
    return result.message.seq


async def store_silently(parts: Components, session_id: str, sender: str, content: str) -> Message:
    """Persist a message with the next seq WITHOUT publishing it (a lost publish)."""
    message = Message(
        message_id=new_id("msg"),
        session_id=session_id,
        seq=0,
        sender_type="user",
        sender_id=sender,
        message_type="text",
        content=content,
        metadata=None,
        created_at=utcnow(),
    )
    stored, created = await parts.messages.store.append(message)
    assert created
    return stored


def event_bytes(message: Message) -> bytes:
    """A message's event as the publisher puts it on the bus."""
    return Envelope.of(events.message_event(message)).encode()


class BusTap:
    """Records every event published on a session's channels of the bus."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, _channel: str, data: bytes) -> None:
        self.events.append(Envelope.decode(data).event)

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("type") == kind]


class FakeSocket:
    """An in-process client: what a Connection writes lands in `frames`.

    With `stall=True` its first send never completes, like a client that stopped reading.
    """

    def __init__(self, *, stall: bool = False) -> None:
        self.frames: list[dict[str, Any]] = []
        self.closed: tuple[int, str] | None = None
        self.stall = stall

    async def send(self, frame: bytes) -> None:
        if self.stall:
            await asyncio.get_running_loop().create_future()  # never resolves
        self.frames.append(orjson.loads(frame))

    async def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("type") == kind]

    def seqs(self) -> list[int]:
        return [f["seq"] for f in self.of_type("message")]

    def system(self, name: str) -> list[str]:
        """User ids of the `system` frames named `name`, in arrival order."""
        return [f["user_id"] for f in self.of_type("system") if f.get("event") == name]


def new_connection(user_id: str, socket: FakeSocket, queue_size: int = 1024) -> Connection:
    sink = AwaitingSink(socket.send, socket.close)
    conn = Connection(new_id("conn"), user_id, sink, queue_size)
    return conn


async def attach(
    hub: Hub, session_id: str, user_id: str, socket: FakeSocket, queue_size: int = 1024
) -> Subscription:
    """A single-session connection on `hub`, as `/ws/{session_id}` makes one (not live)."""
    conn = new_connection(user_id, socket, queue_size)
    await hub.connect(conn)
    return await hub.subscribe(conn, session_id)


async def detach(hub: Hub, sub: Subscription) -> None:
    await hub.disconnect(sub.conn)
    await sub.conn.stop()


async def eventually(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Wait until `check()` holds; fail with `what` when it does not within `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


async def settle(seconds: float = 0.1) -> None:
    """Give writer tasks time to deliver anything that (wrongly) is still on its way."""
    await asyncio.sleep(seconds)


@contextlib.asynccontextmanager
async def serving(app: ASGIApp, **config: Any) -> AsyncIterator[int]:
    """`app` on a real uvicorn server in this process (httptools with the `serve` head
    cap and the batched WebSocket protocol, as `serve` runs it), on a free port; yields
    the port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        http=bounded_http_protocol(16_384),
        ws=DirectFramesProtocol,
        log_config=None,
        lifespan="off",
        **config,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:  # noqa: ASYNC110 - uvicorn offers no event to wait on
        await asyncio.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        await task
