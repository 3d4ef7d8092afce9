"""Sessions: creating, listing, reading, ending and deleting conversations; membership."""

from __future__ import annotations

import builtins
from collections.abc import Awaitable, Callable
from datetime import datetime

import orjson

from chatservice import events
from chatservice.bus.base import Presence
from chatservice.domain import (
    WRITABLE_STATUSES,
    NewSession,
    Participant,
    Principal,
    Role,
    Session,
    SessionDetail,
    SessionKind,
    SessionStatus,
    SessionSummary,
    isoformat,
    new_id,
    utcnow,
)
from chatservice.publisher import Publisher
from chatservice.services.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
    SessionClosed,
    TooLarge,
)
from chatservice.store.sessions import SessionStore

MAX_PARTICIPANTS = 1000
MAX_METADATA_BYTES = 16_384
MAX_TITLE_LENGTH = 200
MAX_USER_ID_LENGTH = 100
MAX_DISPLAY_NAME = 200  # chat_participants.display_name
READ_ONLY = "the session has ended; it is read-only"
LISTABLE_STATUSES = (
    SessionStatus.SCHEDULED.value,
    SessionStatus.ACTIVE.value,
    SessionStatus.ARCHIVED.value,
)


def check_metadata(metadata: object) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        raise InvalidInput("metadata must be a JSON object")
    if len(orjson.dumps(metadata)) > MAX_METADATA_BYTES:
        raise TooLarge(f"metadata is larger than {MAX_METADATA_BYTES} bytes")


class SessionService:
    def __init__(self, store: SessionStore, publisher: Publisher, presence: Presence) -> None:
        self.store = store
        self.publisher = publisher
        self.presence = presence
        # Told about every session that ends (the archive is written there) or is deleted.
        self.end_listeners: list[Callable[[Session], Awaitable[None]]] = []
        self.delete_listeners: list[Callable[[Session], Awaitable[None]]] = []

    async def create(self, principal: Principal, request: NewSession) -> tuple[SessionDetail, bool]:
        """Create a session; a `direct` pair that exists already is returned (created=False)."""
        kind = request.kind
        if kind not in {k.value for k in SessionKind}:
            raise InvalidInput("kind must be one of agent, direct, group")
        if request.title is not None and len(request.title) > MAX_TITLE_LENGTH:
            raise InvalidInput(f"title is longer than {MAX_TITLE_LENGTH} characters")
        check_metadata(request.metadata)
        others = _other_participants(principal.user_id, request.participants)
        direct_key = None
        if kind == SessionKind.AGENT:
            if request.agent_id is None:
                raise InvalidInput("an agent session needs agent_id")
        elif request.agent_id is not None:
            raise InvalidInput(f"a {kind} session has no agent_id")
        if request.agent_id is not None and await self.store.get_agent(request.agent_id) is None:
            raise InvalidInput(f"agent {request.agent_id} does not exist", code="UNKNOWN_AGENT")
        if kind == SessionKind.DIRECT:
            if len(others) != 1:
                raise InvalidInput("a direct session has exactly one other participant")
            direct_key = "|".join(sorted((principal.user_id, others[0])))

        now = utcnow()
        scheduled = request.scheduled_at is not None and request.scheduled_at > now
        session = Session(
            session_id=new_id("sess"),
            trace_id=new_id("trace"),
            user_id=principal.user_id,
            kind=kind,
            status=SessionStatus.SCHEDULED.value if scheduled else SessionStatus.ACTIVE.value,
            title=request.title,
            agent_id=request.agent_id,
            metadata=request.metadata,
            created_at=now,
            updated_at=now,
            scheduled_at=request.scheduled_at,
        )
        members = [
            Participant(
                session.session_id,
                principal.user_id,
                Role.OWNER.value,
                now,
                display_name=(principal.name or "")[:MAX_DISPLAY_NAME] or None,
            )
        ] + [Participant(session.session_id, uid, Role.MEMBER.value, now) for uid in others]
        stored, created = await self.store.create(session, members, direct_key)
        detail = await self.store.detail(stored)
        if created:
            await self._tell_members(
                [m.user_id for m in detail.participants],
                stored.session_id,
                "created",
                principal.user_id,
                now,
            )
        return detail, created

    async def require_member(
        self, principal: Principal, session_id: str
    ) -> tuple[Session, Participant]:
        """The session, if it exists and the caller takes part in it: else 404 / 403."""
        session, member = await self.store.membership(session_id, principal.user_id)
        if session is None or session.status == SessionStatus.DELETED:
            raise NotFound("session not found", code="SESSION_NOT_FOUND")
        if member is None:
            raise Forbidden("you are not a participant of this session")
        name = (principal.name or "")[:MAX_DISPLAY_NAME]
        if name and name != member.display_name:
            # Members other than the creator are added by id; their name is learnt from
            # their own token (a write only when it changes), for transcripts.
            await self.store.set_display_name(session_id, principal.user_id, name)
            member.display_name = name
        return session, member

    async def list(
        self,
        principal: Principal,
        *,
        status: str | None,
        agent_id: int | None,
        limit: int,
        offset: int,
    ) -> tuple[list[SessionSummary], int]:
        if status is not None and status not in LISTABLE_STATUSES:
            raise InvalidInput("status must be one of scheduled, active, archived")
        statuses = (status,) if status else LISTABLE_STATUSES
        return await self.store.list_for_user(
            principal.user_id, statuses=statuses, agent_id=agent_id, limit=limit, offset=offset
        )

    async def detail(self, principal: Principal, session_id: str) -> SessionDetail:
        session, _ = await self.require_member(principal, session_id)
        detail = await self.store.detail(session)
        try:
            detail.online = await self.presence.online(session_id)
        except Exception:  # presence is advisory; the detail still answers
            detail.online = []
        return detail

    async def delete(self, principal: Principal, session_id: str) -> None:
        _session, member = await self.require_member(principal, session_id)
        if member.role != Role.OWNER:
            raise Forbidden("only the session's owner can delete it")
        now = utcnow()
        changed = await self.store.set_status(
            session_id,
            SessionStatus.DELETED.value,
            now=now,
            only_from=(*WRITABLE_STATUSES, SessionStatus.ARCHIVED.value),
        )
        if changed is not None:
            for listener in self.delete_listeners:
                await listener(changed)
            await self._announce(session_id, "session_deleted", principal.user_id, now)
            members = await self.store.participant_ids(session_id)
            await self._tell_members(members, session_id, "deleted", principal.user_id, now)

    async def end(self, principal: Principal, session_id: str) -> Session:
        """Archive the session (idempotent: ending an ended session returns it as it is)."""
        session, member = await self.require_member(principal, session_id)
        if member.role != Role.OWNER and session.kind == SessionKind.GROUP:
            raise Forbidden("only the group's owner can end it")
        if session.status == SessionStatus.ARCHIVED:
            return session
        now = utcnow()
        ended = await self.store.set_status(
            session_id,
            SessionStatus.ARCHIVED.value,
            now=now,
            only_from=WRITABLE_STATUSES,
            ended=True,
        )
        if ended is None:  # a concurrent end or delete won
            session, _ = await self.require_member(principal, session_id)
            return session
        # The archive is written first, so a client reacting to the event can fetch it.
        session = await self._ended(ended)
        await self._announce(session_id, "session_ended", principal.user_id, now)
        members = await self.store.participant_ids(session_id)
        await self._tell_members(members, session_id, "ended", principal.user_id, now)
        return session

    async def expire(self, session_id: str, quiet_since: datetime) -> Session | None:
        """End a session with no activity since `quiet_since` (the idle job); None if it
        ended meanwhile or became active again."""
        now = utcnow()
        ended = await self.store.set_status(
            session_id,
            SessionStatus.ARCHIVED.value,
            now=now,
            only_from=WRITABLE_STATUSES,
            ended=True,
            quiet_since=quiet_since,
        )
        if ended is None:
            return None
        session = await self._ended(ended)
        await self._announce(session_id, "session_ended", None, now, reason="idle")
        members = await self.store.participant_ids(session_id)
        await self._tell_members(members, session_id, "ended", None, now)
        return session

    async def _ended(self, session: Session) -> Session:
        for listener in self.end_listeners:
            await listener(session)
        # The listeners (the archive) may have moved the session on; answer its state now.
        return await self.store.get(session.session_id) or session

    async def mark_read(self, principal: Principal, session_id: str, seq: int) -> tuple[int, int]:
        """Move the caller's read watermark forward; returns (watermark, unread_count)."""
        if seq < 0:
            raise InvalidInput("seq must be zero or more")
        session, member = await self.require_member(principal, session_id)
        target = min(seq, session.last_seq)
        watermark = await self.store.mark_read(session_id, principal.user_id, target)
        unread = await self.store.unread_count(session_id, principal.user_id, watermark)
        if watermark > member.last_read_seq:
            await self.publisher.publish(
                events.receipt_event(session_id, principal.user_id, watermark)
            )
            # The user's other devices follow: their unread badges change too.
            await self.publisher.publish(
                events.unread_event(session_id, watermark, unread), to_user=principal.user_id
            )
        return watermark, unread

    async def add_participants(
        self, principal: Principal, session_id: str, user_ids: builtins.list[str]
    ) -> tuple[builtins.list[str], SessionDetail]:
        """The group's owner adds members; returns (added, session detail)."""
        session, _ = await self._require_group_owner(principal, session_id)
        requested = _other_participants(principal.user_id, user_ids)
        if not requested:
            raise InvalidInput("user_ids must name at least one other user")
        now = utcnow()
        added = await self.store.add_participants(session_id, requested, now)
        for user_id in added:
            await self._announce(
                session_id, "participant_added", user_id, now, by=principal.user_id
            )
            await self.publisher.publish(
                events.session_change_event(session_id, "added", principal.user_id, isoformat(now)),
                to_user=user_id,
            )
        return added, await self.store.detail(session)

    async def remove_participant(self, principal: Principal, session_id: str, user_id: str) -> None:
        """The owner removes a member, or a member leaves; the owner cannot leave."""
        session, member = await self.require_member(principal, session_id)
        leaving = user_id == principal.user_id
        if leaving and member.role == Role.OWNER:
            raise Conflict(
                "the owner cannot leave; delete the session instead", code="OWNER_CANNOT_LEAVE"
            )
        if not leaving:
            await self._require_group_owner(principal, session_id)
        if session.kind != SessionKind.GROUP:
            raise Conflict(
                f"the membership of a {session.kind} session is fixed", code="FIXED_MEMBERSHIP"
            )
        if not await self.store.remove_participant(session_id, user_id):
            raise NotFound(
                f"{user_id} is not a participant of this session", code="PARTICIPANT_NOT_FOUND"
            )
        now = utcnow()
        await self._announce(session_id, "participant_removed", user_id, now, by=principal.user_id)
        await self.publisher.publish(
            events.session_change_event(session_id, "removed", principal.user_id, isoformat(now)),
            to_user=user_id,
        )

    async def _require_group_owner(
        self, principal: Principal, session_id: str
    ) -> tuple[Session, Participant]:
        session, member = await self.require_member(principal, session_id)
        if session.kind != SessionKind.GROUP:
            raise Conflict(
                f"the membership of a {session.kind} session is fixed", code="FIXED_MEMBERSHIP"
            )
        if member.role != Role.OWNER:
            raise Forbidden("only the group's owner can change its members")
        return session, member

    async def _tell_members(
        self,
        user_ids: builtins.list[str],
        session_id: str,
        change: str,
        by: str | None,
        when: datetime,
    ) -> None:
        """Each member's own channel hears of it: their session list changes."""
        event = events.session_change_event(session_id, change, by, isoformat(when))
        for user_id in user_ids:
            await self.publisher.publish(event, to_user=user_id)

    async def _announce(
        self, session_id: str, name: str, user_id: str | None, when: datetime, **extra: str
    ) -> None:
        await self.publisher.publish(
            events.system_event(session_id, name, user_id, isoformat(when), **extra)
        )


def require_writable(session: Session) -> None:
    """Ended (archived) sessions are read-only: no sends, uploads, edits or deletes."""
    if session.status not in WRITABLE_STATUSES:
        raise SessionClosed(READ_ONLY)


def _other_participants(creator: str, requested: list[str]) -> list[str]:
    seen: dict[str, None] = {}
    for raw in requested:
        if not isinstance(raw, str):
            raise InvalidInput("participants must be user id strings")
        user_id = raw.strip()
        if not user_id or len(user_id) > MAX_USER_ID_LENGTH:
            raise InvalidInput("a participant id must be 1-100 characters")
        if user_id != creator:
            seen[user_id] = None
    if len(seen) > MAX_PARTICIPANTS:
        raise InvalidInput(f"at most {MAX_PARTICIPANTS} participants")
    return list(seen)
