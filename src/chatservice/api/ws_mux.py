"""`/ws`: one native WebSocket for all of a user's conversations.

The socket opens with the token alone and says `connected`. The client then follows
sessions with `subscribe {session_id, since_seq}` (answered by `subscribed`, then that
session's replay and live events, with the same no-gap, no-duplicate guarantee as
`/ws/{session_id}`) and stops with `unsubscribe {session_id}`. Every frame in both
directions names its session; the client's frames act on a session it follows. The
socket also carries the user's own events: `session_changed` (created, added, removed,
ended, deleted) and `unread` (their read position moved on some device). A refused
subscribe, or a subscription lost because the user was removed or the session deleted,
is a frame on a socket that stays open.
"""

from __future__ import annotations

import logging

from fastapi import WebSocket

from chatservice.api import sockets
from chatservice.components import Components
from chatservice.domain import JSON, Principal, Session, isoformat, utcnow
from chatservice.realtime.codec import CloseReason
from chatservice.realtime.connection import Connection
from chatservice.services.errors import Forbidden, NotFound
from chatservice.values import UnacceptableValue, check_text

log = logging.getLogger(__name__)

# Sessions one socket may follow at once; a client showing more unsubscribes first.
MAX_SUBSCRIPTIONS = 500


async def multiplexed_socket(websocket: WebSocket) -> None:
    parts: Components = websocket.app.state.components
    refusal = sockets.check_origin(parts, websocket)
    principal = sockets.authenticate(parts, websocket) if refusal is None else refusal
    if not isinstance(principal, Principal):
        await sockets.refuse(websocket, principal)
        return
    refusal = sockets.at_capacity(parts)
    if refusal is not None:
        await sockets.refuse(websocket, refusal)
        return
    conn = sockets.new_connection(parts, websocket, principal, multiplexed=True)
    followed = _Followed(parts, conn, principal)

    async def begin() -> bool:
        # Following the user's channel before the handshake completes: no event of
        # theirs published after the client sees `connected` can be missed.
        try:
            await parts.hub.connect(conn)
        except Exception:
            log.exception("connecting a multiplexed WebSocket failed")
            await sockets.refuse(websocket, (CloseReason.INTERNAL, "internal error; retry"))
            return False
        await websocket.accept()
        conn.send_control({"type": "connected", "user_id": principal.user_id})
        return True

    await sockets.run(
        parts,
        websocket,
        conn,
        principal,
        begin=begin,
        target=followed.target,
        special=followed.special,
    )


class _Followed:
    """The sessions one `/ws` socket follows, with what membership said when it began."""

    def __init__(self, parts: Components, conn: Connection, principal: Principal) -> None:
        self.parts = parts
        self.conn = conn
        self.principal = principal
        # Membership is checked at subscribe; losing it later revokes the subscription
        # (the hub hears `participant_removed`), so frames need no database check.
        self.sessions: dict[str, Session] = {}

    def _error(self, code: str, message: str, session_id: object = None) -> None:
        extra = {"session_id": session_id} if isinstance(session_id, str) else {}
        self.conn.send_control(sockets.error(code, message, **extra))

    async def target(self, frame: JSON) -> Session | None:
        session_id = frame.get("session_id")
        if not isinstance(session_id, str):
            self._error("VALIDATION_ERROR", "session_id: every frame on /ws names its session")
            return None
        sub = self.conn.subscriptions.get(session_id)
        session = self.sessions.get(session_id)
        if sub is None or not sub.active or session is None:
            self._error("NOT_SUBSCRIBED", "subscribe to the session first", session_id)
            return None
        return session

    async def special(self, frame: JSON) -> bool:
        kind = frame.get("type")
        if kind == "subscribe":
            await self._subscribe(frame)
        elif kind == "unsubscribe":
            await self._unsubscribe(frame)
        elif kind == "ping":
            self.conn.send_control({"type": "pong", "timestamp": isoformat(utcnow())})
        else:
            return False
        return True

    async def _subscribe(self, frame: JSON) -> None:
        session_id = frame.get("session_id")
        if not isinstance(session_id, str) or not 1 <= len(session_id) <= 100:
            self._error("VALIDATION_ERROR", "session_id: a session id is required")
            return
        try:
            check_text(session_id, "session_id")
        except UnacceptableValue as exc:
            self._error("VALIDATION_ERROR", str(exc))
            return
        since = sockets.parse_since(frame.get("since_seq"))
        if isinstance(since, tuple):
            self._error("VALIDATION_ERROR", since[1], session_id)
            return
        if session_id in self.conn.subscriptions:
            self._error("ALREADY_SUBSCRIBED", "the socket follows this session", session_id)
            return
        if len(self.conn.subscriptions) >= MAX_SUBSCRIPTIONS:
            self._error(
                "TOO_MANY_SUBSCRIPTIONS",
                f"a socket follows at most {MAX_SUBSCRIPTIONS} sessions",
                session_id,
            )
            return
        session = await self._member_of(session_id)
        if session is None:
            return
        sub = await self.parts.hub.subscribe(self.conn, session_id)
        # Membership again, now that removals reach this subscription: one that happened
        # between the first check and the subscription would otherwise go unnoticed.
        session = await self._member_of(session_id)
        if session is None:
            await self.parts.hub.unsubscribe(sub)
            return
        self.sessions[session_id] = session

        def subscribed(since_seq: int, last_seq: int) -> JSON:
            return {
                "type": "subscribed",
                "session_id": session_id,
                "since_seq": since_seq,
                "last_seq": last_seq,
            }

        await sockets.follow(self.parts, sub, since, subscribed)

    async def _member_of(self, session_id: str) -> Session | None:
        try:
            session, _ = await self.parts.sessions.require_member(self.principal, session_id)
        except NotFound as exc:
            self._error(exc.code, exc.message, session_id)
            return None
        except Forbidden as exc:
            self._error(exc.code, exc.message, session_id)
            return None
        return session

    async def _unsubscribe(self, frame: JSON) -> None:
        session_id = frame.get("session_id")
        sub = self.conn.subscriptions.get(session_id) if isinstance(session_id, str) else None
        if sub is None:
            self._error("NOT_SUBSCRIBED", "the socket does not follow this session", session_id)
            return
        await self.parts.hub.unsubscribe(sub)
        self.sessions.pop(sub.session_id, None)
        self.conn.send_control(
            {"type": "unsubscribed", "session_id": sub.session_id, "reason": "client"}
        )
