"""`/ws/{session_id}`: the native WebSocket protocol (the frames of the A2G-compatible REST
contract, plus this service's own).

This module only parses, authenticates and maps errors; what a frame does is decided by
the services, and how events reach this socket by the hub (`realtime/`).
"""

from __future__ import annotations

import asyncio
import logging
import time

import orjson
from fastapi import APIRouter, WebSocket
from pydantic import ValidationError
from starlette.websockets import WebSocketDisconnect

from chatservice import events
from chatservice.api.frames import (
    FRAME_TYPES,
    CancelFrame,
    FileFrame,
    MessageFrame,
    ReadFrame,
    TypingFrame,
)
from chatservice.auth import AuthError
from chatservice.components import Components
from chatservice.domain import Principal, Session, isoformat, new_id, utcnow
from chatservice.realtime.connection import (
    CLOSE_FORBIDDEN,
    CLOSE_NOT_FOUND,
    CLOSE_TRY_AGAIN_LATER,
    CLOSE_UNAUTHORIZED,
    Connection,
)
from chatservice.services.errors import Forbidden, NotFound, ServiceError
from chatservice.services.messages import Draft
from chatservice.values import UnacceptableValue, check_json, check_text

log = logging.getLogger(__name__)
router = APIRouter()

CLOSE_BAD_REQUEST = 4400
CLOSE_INTERNAL_ERROR = 1011
REPLAY_PAGE = 500


@router.websocket("/ws/{session_id}")
async def chat_socket(websocket: WebSocket, session_id: str) -> None:
    parts: Components = websocket.app.state.components
    try:
        refusal, principal, session = await _admit(parts, websocket, session_id)
    except Exception:  # e.g. the database refused a connection: say so with a close code
        log.exception("admitting a WebSocket to %s failed", session_id)
        refusal, principal, session = (CLOSE_INTERNAL_ERROR, "internal error; retry"), None, None
    if refusal is not None or principal is None or session is None:
        # Accept, then close: closing before accepting would turn every refusal into a
        # bare HTTP 403 and the client would never see our close code.
        await websocket.accept()
        await websocket.close(*(refusal or (CLOSE_BAD_REQUEST, "refused")))
        return
    since_raw = websocket.query_params.get("since_seq")
    conn = Connection(
        new_id("conn"),
        session_id,
        principal.user_id,
        websocket.send_text,
        websocket.close,
        parts.settings.ws_send_queue_size,
        write_timeout=parts.settings.ws_write_timeout,
    )
    expiry: asyncio.TimerHandle | None = None
    try:
        # Attached before the handshake completes: anything sent after the client sees
        # the connection open is already on its way to it.
        try:
            await parts.hub.attach(conn)
        except Exception:
            log.exception("attaching a WebSocket to %s failed", session_id)
            await websocket.accept()
            await websocket.close(CLOSE_INTERNAL_ERROR, "internal error; retry")
            return
        await websocket.accept()
        conn.start()
        expiry = _close_at_expiry(conn, principal)
        current = await parts.messages.last_seq(session_id)
        if since_raw is not None:
            conn.last_seq = min(int(since_raw), current)
        # Tells the client where its stream starts, so it can resume from there even if
        # it drops before any message arrives.
        conn.send_nowait(
            events.encode(
                {
                    "type": "connected",
                    "session_id": session_id,
                    "user_id": principal.user_id,
                    "since_seq": conn.last_seq,
                    "last_seq": current,
                }
            ).decode()
        )
        if since_raw is not None:
            await _replay(parts, conn)
        await _resume_streams(parts, conn)
        await conn.go_live()
        await _read_frames(parts, websocket, conn, principal, session)
    except WebSocketDisconnect:
        pass
    except asyncio.CancelledError:
        if not conn.reader_interrupted:
            raise  # the server is stopping, not this connection
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
    except Exception:  # a broken dependency mid-connection: close cleanly, client resumes
        log.exception("WebSocket to %s failed", session_id)
        conn.kill(CLOSE_INTERNAL_ERROR, "internal error; reconnect with since_seq")
    finally:
        if expiry is not None:
            expiry.cancel()
        await parts.hub.detach(conn)
        await conn.stop()
        await parts.typing.stopped(session_id, principal.user_id)


def _close_at_expiry(conn: Connection, principal: Principal) -> asyncio.TimerHandle | None:
    """A connection lives no longer than its token: at `exp` it closes with 4401 and the
    client reconnects with a fresh token (and `since_seq`, so nothing is missed)."""
    if principal.expires_at is None:
        return None
    loop = asyncio.get_running_loop()
    delay = max(0.0, principal.expires_at - time.time())
    return loop.call_later(delay, conn.kill, CLOSE_UNAUTHORIZED, "token expired")


async def _admit(
    parts: Components, websocket: WebSocket, session_id: str
) -> tuple[tuple[int, str] | None, Principal | None, Session | None]:
    """Who is connecting and to what; or the close code and reason that refuse them."""
    allowed_origins = parts.settings.cors_origins
    origin = websocket.headers.get("origin")
    # Browsers send Origin on every WebSocket handshake and cannot forge it: a page of
    # another site must not use a visitor's token (cross-site WebSocket hijacking).
    if allowed_origins and "*" not in allowed_origins and origin not in (None, *allowed_origins):
        return (CLOSE_FORBIDDEN, "origin not allowed"), None, None
    try:
        check_text(session_id, "session_id")
    except UnacceptableValue:
        return (CLOSE_NOT_FOUND, "session not found"), None, None
    try:
        principal = parts.tokens.verify(_token(websocket))
    except AuthError as exc:
        return (CLOSE_UNAUTHORIZED, str(exc)[:120]), None, None
    try:
        session, _ = await parts.sessions.require_member(principal, session_id)
    except NotFound:
        return (CLOSE_NOT_FOUND, "session not found"), None, None
    except Forbidden:
        return (CLOSE_FORBIDDEN, "not a participant of this session"), None, None
    since_raw = websocket.query_params.get("since_seq")
    # isascii: str.isdigit() also accepts digits like "²" that int() refuses.
    if since_raw is not None and not (
        since_raw.isascii() and since_raw.isdigit() and len(since_raw) <= 18
    ):
        return (CLOSE_BAD_REQUEST, "since_seq must be a non-negative integer"), None, None
    if parts.hub.connection_count >= parts.settings.ws_max_connections:
        return (CLOSE_TRY_AGAIN_LATER, "server is at its connection limit"), None, None
    return None, principal, session


def _token(websocket: WebSocket) -> str | None:
    token = websocket.query_params.get("token")
    if token:
        return token
    header = websocket.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


async def _replay(parts: Components, conn: Connection) -> None:
    """Send every message after `conn.last_seq` from the database before live frames."""
    while True:
        frames = await parts.messages.frames_after(conn.session_id, conn.last_seq, REPLAY_PAGE)
        for seq, text in frames:
            await conn.replay(seq, text)
        if len(frames) < REPLAY_PAGE or conn.closed:
            return


async def _resume_streams(parts: Components, conn: Connection) -> None:
    """Answers still streaming: their start and every chunk so far, then live ones."""
    for state in await parts.streams.active_states(conn.session_id):
        start = events.stream_start_event(
            state.session_id,
            state.message_id,
            state.meta.get("sender_id", ""),
            state.meta.get("reply_to", ""),
            None,
        )
        await conn.replay_stream(state.message_id, -1, events.encode(start).decode())
        for index, text in enumerate(state.chunks):
            chunk = events.stream_chunk_event(state.session_id, state.message_id, text, index)
            await conn.replay_stream(state.message_id, index, events.encode(chunk).decode())


async def _read_frames(
    parts: Components,
    websocket: WebSocket,
    conn: Connection,
    principal: Principal,
    session: Session,
) -> None:
    limit = parts.settings.ws_message_size_limit
    this_task = asyncio.current_task()
    while not conn.closed:
        conn.idle_reader = this_task
        try:
            received = await websocket.receive()
        finally:
            conn.idle_reader = None
        if received["type"] == "websocket.disconnect":
            return
        text = received.get("text")
        if text is None:
            conn.send_nowait(_error("BAD_FRAME", "frames must be JSON text"))
            continue
        if len(text) > limit or len(text.encode()) > limit:
            conn.send_nowait(_error("FRAME_TOO_LARGE", f"frame is larger than {limit} bytes"))
            continue
        try:
            data = orjson.loads(text)
        except orjson.JSONDecodeError:
            conn.send_nowait(_error("BAD_JSON", "frame is not valid JSON"))
            continue
        if not isinstance(data, dict):
            conn.send_nowait(_error("BAD_FRAME", "a frame is a JSON object with a type"))
            continue
        try:
            check_json(data)
        except UnacceptableValue as exc:
            conn.send_nowait(_error("VALIDATION_ERROR", str(exc)))
            continue
        kind = data.get("type")
        model = FRAME_TYPES.get(kind) if isinstance(kind, str) else None
        if model is None:
            conn.send_nowait(_error("UNKNOWN_TYPE", f"unknown frame type {str(kind)[:40]!r}"))
            continue
        ref = data.get("client_msg_id") if isinstance(data.get("client_msg_id"), str) else None
        try:
            frame = model.model_validate(data)
            await _handle(parts, conn, principal, session, frame)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first.get("loc", ()))
            conn.send_nowait(
                _error("VALIDATION_ERROR", f"{field}: {first.get('msg', 'invalid')}", ref)
            )
        except ServiceError as exc:
            conn.send_nowait(_error(exc.code, exc.message, ref, **exc.extra))
        except Exception:  # e.g. the database is unreachable: this frame failed, not the socket
            log.exception("handling a %s frame in %s failed", kind, session.session_id)
            conn.send_nowait(_error("INTERNAL", "internal error; try again", ref))


async def _handle(
    parts: Components, conn: Connection, principal: Principal, session: Session, frame: object
) -> None:
    if isinstance(frame, MessageFrame):
        await parts.messages.send_as_member(
            principal,
            session,
            Draft(
                content=frame.content, metadata=frame.metadata, client_msg_id=frame.client_msg_id
            ),
        )
    elif isinstance(frame, FileFrame):
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
        conn.send_nowait(events.encode({"type": "pong", "timestamp": isoformat(utcnow())}).decode())


def _error(code: str, message: str, client_msg_id: str | None = None, **extra: object) -> str:
    if client_msg_id is not None:
        extra["client_msg_id"] = client_msg_id
    return events.error_frame(code, message, **extra).decode()
