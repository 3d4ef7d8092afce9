"""What the native WebSocket endpoints share: admission, following a session, reading
frames, and handing each frame to the service that does what it says.

`/ws/{session_id}` (one session per socket, `ws.py`) and `/ws` (many, `ws_mux.py`) differ
only in how a socket comes to follow sessions; a frame from either goes through
`read_frames` (a `message` through `_pipeline`, any other through `handle`) to a service,
and the events it causes come back through the publisher, the bus and the hub.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from fastapi import WebSocket
from pydantic import ValidationError
from starlette.websockets import WebSocketDisconnect

from chatservice import events
from chatservice.api.direct_frames import direct_sink
from chatservice.api.frames import (
    FRAME_TYPES,
    CancelFrame,
    FileFrame,
    ReadFrame,
    TypingFrame,
)
from chatservice.auth import AuthError
from chatservice.components import Components
from chatservice.domain import JSON, Principal, Session, isoformat, new_id, utcnow
from chatservice.envelope import Envelope
from chatservice.realtime.codec import NATIVE, CloseReason
from chatservice.realtime.connection import Connection, Subscription
from chatservice.realtime.sink import AwaitingSink
from chatservice.services.errors import ServiceError
from chatservice.services.messages import Draft
from chatservice.values import UnacceptableValue, check_json

log = logging.getLogger(__name__)

REPLAY_PAGE = 500

Refusal = tuple[CloseReason, str]


def check_origin(parts: Components, websocket: WebSocket) -> Refusal | None:
    """Browsers send Origin on every WebSocket handshake and cannot forge it: a page of
    another site must not use a visitor's token (cross-site WebSocket hijacking)."""
    allowed = parts.settings.cors_origins
    origin = websocket.headers.get("origin")
    if allowed and "*" not in allowed and origin not in (None, *allowed):
        return CloseReason.FORBIDDEN, "origin not allowed"
    return None


def authenticate(parts: Components, websocket: WebSocket) -> Principal | Refusal:
    try:
        return parts.tokens.verify(_token(websocket))
    except AuthError as exc:
        return CloseReason.UNAUTHORIZED, str(exc)[:120]


def at_capacity(parts: Components) -> Refusal | None:
    if parts.hub.connection_count >= parts.settings.ws_max_connections:
        return CloseReason.TRY_AGAIN_LATER, "server is at its connection limit"
    return None


def parse_since(raw: object) -> int | Refusal | None:
    """`since_seq` as a query parameter (text) or a frame field (a number)."""
    if raw is None:
        return None
    # isascii: str.isdigit() also accepts digits like "²" that int() refuses.
    if isinstance(raw, str) and raw.isascii() and raw.isdigit() and len(raw) <= 18:
        return int(raw)
    if isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw < 10**18:
        return raw
    return CloseReason.BAD_REQUEST, "since_seq must be a non-negative integer"


async def refuse(websocket: WebSocket, refusal: Refusal) -> None:
    # Accept, then close: closing before accepting would turn every refusal into a
    # bare HTTP 403 and the client would never see our close code.
    reason, detail = refusal
    await websocket.accept()
    await websocket.close(NATIVE.close_code(reason), detail)


def new_connection(
    parts: Components, websocket: WebSocket, principal: Principal, *, multiplexed: bool
) -> Connection:
    sink = direct_sink(websocket) or AwaitingSink(
        lambda frame: websocket.send_text(frame.decode()), websocket.close
    )
    return Connection(
        new_id("conn"),
        principal.user_id,
        sink,
        parts.settings.ws_send_queue_size,
        write_timeout=parts.settings.ws_write_timeout,
        multiplexed=multiplexed,
        expires_at=principal.expires_at,
    )


def _token(websocket: WebSocket) -> str | None:
    token = websocket.query_params.get("token")
    if token:
        return token
    header = websocket.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


async def run(
    parts: Components,
    websocket: WebSocket,
    conn: Connection,
    principal: Principal,
    *,
    begin: Callable[[], Awaitable[bool]],
    target: Target,
    special: Special | None = None,
) -> None:
    """A native socket's life once admitted: `begin` (connect it to the hub, accept, greet;
    False if it could not), read frames until the client or the server ends it, then
    clean up: the hub forgets it, it writes nothing more, typing it left on is turned off."""
    try:
        if await begin():
            await read_frames(parts, websocket, conn, principal, target, special)
    except WebSocketDisconnect:
        pass
    except asyncio.CancelledError:
        if not conn.reader_interrupted:
            raise  # the server is stopping, not this connection
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
    except Exception:  # a broken dependency mid-connection: close cleanly, client resumes
        log.exception("WebSocket %s of %s failed", conn.conn_id, conn.user_id)
        conn.kill(CloseReason.INTERNAL, "internal error; reconnect with since_seq")
    finally:
        followed = list(conn.subscriptions)
        await parts.hub.disconnect(conn)
        await conn.stop()
        for session_id in followed:
            await parts.typing.stopped(session_id, principal.user_id)


# -- following a session ------------------------------------------------------------------


async def follow(
    parts: Components,
    sub: Subscription,
    since: int | None,
    announce: Callable[[int, int], JSON],
) -> None:
    """Bring a new subscription up to date, then live: `announce(since, last)` (where the
    client's stream starts, so it can resume from there even if it drops before any
    message arrives), the messages after `since` from the database, the answers still
    streaming, then live events. Nothing falls between, nothing comes twice."""
    current = await parts.history.last_seq(sub.session_id)
    if since is not None:
        sub.last_seq = min(since, current)
    sub.conn.send_control(announce(sub.last_seq, current))
    if since is not None:
        await _replay(parts, sub)
    await _resume_streams(parts, sub)
    await sub.go_live()


async def _replay(parts: Components, sub: Subscription) -> None:
    while True:
        found = await parts.history.after(sub.session_id, sub.last_seq, REPLAY_PAGE)
        for envelope in found:
            await sub.replay(envelope)
        if len(found) < REPLAY_PAGE or sub.conn.closed:
            return


async def _resume_streams(parts: Components, sub: Subscription) -> None:
    """Answers still streaming: their start and every chunk so far, then live ones."""
    for state in await parts.streams.active_states(sub.session_id):
        start = events.stream_start_event(
            state.session_id,
            state.message_id,
            state.meta.get("sender_id", ""),
            state.meta.get("reply_to", ""),
            None,
        )
        await sub.replay(Envelope.of(start))
        for index, text in enumerate(state.chunks):
            chunk = events.stream_chunk_event(state.session_id, state.message_id, text, index)
            await sub.replay(Envelope.of(chunk))


# -- reading frames -----------------------------------------------------------------------

# What a frame is for: the session it acts on (None when the frame itself is refused,
# after an error frame went out).
Target = Callable[[JSON], Awaitable[Session | None]]
# Frames a transport handles itself (subscribe, unsubscribe) before the common ones.
Special = Callable[[JSON], Awaitable[bool]]


async def read_frames(
    parts: Components,
    websocket: WebSocket,
    conn: Connection,
    principal: Principal,
    target: Target,
    special: Special | None = None,
) -> None:
    limit = parts.settings.ws_message_size_limit
    this_task = asyncio.current_task()
    in_flight = _InFlight(conn)
    try:
        while not conn.closed:
            conn.idle_reader = this_task
            try:
                received = await websocket.receive()
            finally:
                conn.idle_reader = None
            if received["type"] == "websocket.disconnect":
                return
            data = _frame(conn, received.get("text"), limit)
            if data is None:
                continue
            kind = data.get("type")
            ref = data.get("client_msg_id") if isinstance(data.get("client_msg_id"), str) else None
            if kind == "message":
                await _reported(
                    conn, kind, ref, _pipeline(parts, in_flight, principal, target, data)
                )
                continue
            if kind != "typing":
                # Any other frame waits for the messages read before it, so what the client
                # sent in one order happens in that order (a `pong` means all before it was
                # handled; a `read` finds those messages stored).
                await in_flight.drain()
            if special is not None and await special(data):
                continue
            model = FRAME_TYPES.get(kind) if isinstance(kind, str) else None
            if model is None:
                conn.send_control(error("UNKNOWN_TYPE", f"unknown frame type {str(kind)[:40]!r}"))
                continue
            await _reported(conn, kind, ref, _dispatch(parts, conn, principal, target, data, model))
    finally:
        await in_flight.drain()


# How many of one connection's messages may be committing at once while its reader goes on.
MAX_IN_FLIGHT = 64


class _InFlight:
    """A connection's messages whose commits are under way, in the order they were read.

    The reader does not wait for one message's commit before reading the next: the
    store queues their commits in that order (their seqs follow it), and messages read
    together are committed together."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        # A list, not a deque: at most MAX_IN_FLIGHT entries, and an empty deque costs an
        # idle connection 600 bytes more.
        self.tasks: list[asyncio.Task[None]] = []

    async def add(self, work: Awaitable[None]) -> None:
        tasks = self.tasks
        done = 0
        while done < len(tasks) and tasks[done].done():
            done += 1
        del tasks[:done]
        if len(tasks) >= MAX_IN_FLIGHT:
            await asyncio.wait({tasks.pop(0)})
        tasks.append(asyncio.ensure_future(work))

    async def drain(self) -> None:
        while self.tasks:
            await asyncio.wait({self.tasks.pop(0)})


async def _pipeline(
    parts: Components,
    in_flight: _InFlight,
    principal: Principal,
    target: Target,
    data: JSON,
) -> None:
    """A `message` frame: checked here (the service checks every field; no model is built
    on this hot path), committed in the background, errors reported as they come."""
    session = await target(data)
    if session is None:
        return
    message = await parts.messages.prepare(
        principal,
        session,
        Draft(
            content=data.get("content"),
            metadata=data.get("metadata"),
            client_msg_id=data.get("client_msg_id"),
        ),
    )
    ref = message.client_msg_id if isinstance(message.client_msg_id, str) else None
    await in_flight.add(
        _reported(in_flight.conn, "message", ref, parts.messages.commit(session, message))
    )


async def _dispatch(
    parts: Components,
    conn: Connection,
    principal: Principal,
    target: Target,
    data: JSON,
    model: type[Any],
) -> None:
    frame = model.model_validate(data)
    session = await target(data)
    if session is not None:
        await handle(parts, conn, principal, session, frame)


async def _reported(
    conn: Connection, kind: object, ref: str | None, work: Awaitable[object]
) -> None:
    """Run a frame's work; a failure becomes an error frame, never the socket's end."""
    try:
        await work
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first.get("loc", ()))
        conn.send_control(error("VALIDATION_ERROR", f"{field}: {first.get('msg', 'invalid')}", ref))
    except ServiceError as exc:
        conn.send_control(error(exc.code, exc.message, ref, **exc.extra))
    except Exception:  # e.g. the database is unreachable: this frame failed, not the socket
        log.exception("handling a %s frame failed", kind)
        conn.send_control(error("INTERNAL", "internal error; try again", ref))


def _frame(conn: Connection, text: str | None, limit: int) -> JSON | None:
    """The frame as a JSON object with checked values, or None after an error frame."""
    if text is None:
        conn.send_control(error("BAD_FRAME", "frames must be JSON text"))
        return None
    if len(text) > limit or len(text.encode()) > limit:
        conn.send_control(error("FRAME_TOO_LARGE", f"frame is larger than {limit} bytes"))
        return None
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError:
        conn.send_control(error("BAD_JSON", "frame is not valid JSON"))
        return None
    if not isinstance(data, dict):
        conn.send_control(error("BAD_FRAME", "a frame is a JSON object with a type"))
        return None
    try:
        check_json(data)
    except UnacceptableValue as exc:
        conn.send_control(error("VALIDATION_ERROR", str(exc)))
        return None
    return data


async def handle(
    parts: Components, conn: Connection, principal: Principal, session: Session, frame: object
) -> None:
    # `message` frames take the pipelined path (`_pipeline`).
    if isinstance(frame, FileFrame):
        await parts.files.attach(
            principal, session, frame.file_id, frame.message, frame.client_msg_id
        )
    elif isinstance(frame, TypingFrame):
        await parts.typing.set_typing(session.session_id, principal.user_id, frame.is_typing)
    elif isinstance(frame, ReadFrame):
        await parts.sessions.mark_read(principal, session.session_id, frame.seq)
    elif isinstance(frame, CancelFrame):
        await parts.streams.cancel(principal, frame.message_id)
    else:  # ping
        conn.send_control({"type": "pong", "timestamp": isoformat(utcnow())})


def error(code: str, message: str, client_msg_id: str | None = None, **extra: Any) -> JSON:
    if client_msg_id is not None:
        extra["client_msg_id"] = client_msg_id
    return {"type": "error", "code": code, "message": message, **extra}
