"""`/ws/{session_id}`: the native WebSocket protocol, one session per socket (the frames
of the A2G-compatible REST contract, plus this service's own).

This module only admits the socket and subscribes it to its session; reading frames is
shared with `/ws` (`sockets.py`), what a frame does is decided by the services, and how
events reach this socket by the hub (`realtime/`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fastapi import WebSocket

from chatservice.api import sockets
from chatservice.components import Components
from chatservice.domain import JSON, Principal, Session
from chatservice.realtime.codec import CloseReason
from chatservice.services.errors import Forbidden, NotFound
from chatservice.values import UnacceptableValue, check_text

log = logging.getLogger(__name__)


async def chat_socket(websocket: WebSocket, session_id: str) -> None:
    parts: Components = websocket.app.state.components
    try:
        admitted = await _admit(parts, websocket, session_id)
    except Exception:  # e.g. the database refused a connection: say so with a close code
        log.exception("admitting a WebSocket to %s failed", session_id)
        admitted = (CloseReason.INTERNAL, "internal error; retry")
    if not isinstance(admitted, _Admitted):
        await sockets.refuse(websocket, admitted)
        return
    principal, session, since = admitted.principal, admitted.session, admitted.since
    conn = sockets.new_connection(parts, websocket, principal, multiplexed=False)

    async def begin() -> bool:
        await parts.hub.connect(conn)
        # Subscribed before the handshake completes: anything sent after the client sees
        # the connection open is already on its way to it.
        try:
            sub = await parts.hub.subscribe(conn, session_id)
        except Exception:
            log.exception("attaching a WebSocket to %s failed", session_id)
            await sockets.refuse(websocket, (CloseReason.INTERNAL, "internal error; retry"))
            return False
        await websocket.accept()

        def connected(since_seq: int, last_seq: int) -> JSON:
            return {
                "type": "connected",
                "session_id": session_id,
                "user_id": principal.user_id,
                "since_seq": since_seq,
                "last_seq": last_seq,
            }

        await sockets.follow(parts, sub, since, connected)
        return True

    async def target(_frame: JSON) -> Session:
        return session

    await sockets.run(parts, websocket, conn, principal, begin=begin, target=target)


@dataclass(frozen=True, slots=True)
class _Admitted:
    principal: Principal
    session: Session
    since: int | None


async def _admit(
    parts: Components, websocket: WebSocket, session_id: str
) -> _Admitted | sockets.Refusal:
    """Who is connecting, to what, from which seq; or the reason that refuses them."""
    refusal = sockets.check_origin(parts, websocket)
    if refusal is not None:
        return refusal
    try:
        check_text(session_id, "session_id")
    except UnacceptableValue:
        return CloseReason.NOT_FOUND, "session not found"
    principal = sockets.authenticate(parts, websocket)
    if not isinstance(principal, Principal):
        return principal
    try:
        session, _ = await parts.sessions.require_member(principal, session_id)
    except NotFound:
        return CloseReason.NOT_FOUND, "session not found"
    except Forbidden:
        return CloseReason.FORBIDDEN, "not a participant of this session"
    since = sockets.parse_since(websocket.query_params.get("since_seq"))
    if isinstance(since, tuple):
        return since
    refusal = sockets.at_capacity(parts)
    if refusal is not None:
        return refusal
    return _Admitted(principal, session, since)
