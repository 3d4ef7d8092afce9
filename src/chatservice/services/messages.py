"""Messages: validate, dedupe, persist with the next seq, then publish: the spine."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from chatservice import events
from chatservice.bus.base import RateLimiter
from chatservice.domain import (
    Cursor,
    Message,
    MessagePage,
    MessageType,
    Principal,
    SenderType,
    SendResult,
    Session,
    new_id,
    utcnow,
)
from chatservice.publisher import Publisher
from chatservice.services.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
    RateLimited,
    SessionClosed,
    TooLarge,
)
from chatservice.services.sessions import (
    READ_ONLY,
    SessionService,
    check_metadata,
    require_writable,
)
from chatservice.store.message_writer import FileNotAttachable, SessionNotWritable
from chatservice.store.messages import MessageStore

MAX_PAGE = 200
MAX_CLIENT_MSG_ID = 100
USER_MESSAGE_TYPES = frozenset({MessageType.TEXT.value})
EDITABLE_TYPES = frozenset({MessageType.TEXT.value, MessageType.FILE.value})

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Draft:
    """A message as a client sends it, whatever the transport."""

    content: Any
    message_type: str = MessageType.TEXT.value
    metadata: Any = None
    client_msg_id: Any = None
    # A file message: the uploaded file it carries (content is then an optional caption).
    file_id: str | None = None
    # False when the transport already counted this send (an upload counts once).
    rate_limited: bool = True


class MessageService:
    def __init__(
        self,
        sessions: SessionService,
        store: MessageStore,
        publisher: Publisher,
        *,
        max_content_bytes: int,
        rate_limiter: RateLimiter | None = None,
    ) -> None:
        self.sessions = sessions
        self.store = store
        self.publisher = publisher
        self.max_content_bytes = max_content_bytes
        self.rate_limiter = rate_limiter  # None: RATE_LIMIT_ENABLED is off
        # Told about every new message once it is stored and published (agent answers).
        self.listeners: list[Callable[[Session, Message], Awaitable[None]]] = []
        # Told about every deleted message (its files go with it).
        self.delete_listeners: list[Callable[[Message], Awaitable[None]]] = []

    async def send(self, principal: Principal, session_id: str, draft: Draft) -> SendResult:
        session, _ = await self.sessions.require_member(principal, session_id)
        return await self.send_as_member(principal, session, draft)

    async def send_as_member(
        self, principal: Principal, session: Session, draft: Draft
    ) -> SendResult:
        """Send for a caller whose membership the transport already checked (a live socket)."""
        message = await self.prepare(principal, session, draft)
        return await self.commit(session, message, draft.file_id)

    async def prepare(self, principal: Principal, session: Session, draft: Draft) -> Message:
        """The checks of a send (valid, writable, within the rate) and the message to store.

        A transport that reads one client's frames ahead calls this for each frame in
        turn, and `commit` for each without waiting for the previous commit: commits of
        one client's frames are queued in the order they began, so they get their seqs in
        that order and messages that arrive together are stored together.
        """
        self._validate(draft)
        require_writable(session)
        if draft.rate_limited:
            await self.check_rate(principal)
        return Message(
            message_id=new_id("msg"),
            session_id=session.session_id,
            seq=0,
            sender_type=SenderType.USER.value,
            sender_id=principal.user_id,
            message_type=draft.message_type,
            content=draft.content,
            metadata=draft.metadata,
            created_at=utcnow(),
            client_msg_id=draft.client_msg_id,
        )

    async def commit(
        self, session: Session, message: Message, file_id: str | None = None
    ) -> SendResult:
        """Store a prepared message and publish it; its place in the store's queue is
        taken before this first waits."""
        try:
            stored, created = await self.store.append(message, attach_file_id=file_id)
        except SessionNotWritable as exc:
            raise SessionClosed(READ_ONLY) from exc
        except FileNotAttachable as exc:
            raise Conflict(
                "the file does not exist in this session or is already on a message",
                code="FILE_NOT_ATTACHABLE",
            ) from exc
        if created:
            # Persist, then publish: nothing a client sees can be missing from history.
            await self.publisher.publish(events.message_event(stored))
            for listener in self.listeners:
                await listener(session, stored)
        return SendResult(stored, created)

    async def check_rate(self, principal: Principal) -> None:
        """Count one send against the caller's budget; RateLimited when it is spent."""
        if self.rate_limiter is not None:
            wait_ms = await self.rate_limiter.hit(principal.user_id)
            if wait_ms is not None:
                raise RateLimited(wait_ms)

    async def edit(self, principal: Principal, message_id: str, content: Any) -> Message:
        """The sender replaces a message's text; everyone connected sees the edit."""
        message = await self._own_live_message(principal, message_id)
        if message.message_type not in EDITABLE_TYPES:
            raise Conflict(
                f"a {message.message_type} message cannot be edited", code="NOT_EDITABLE"
            )
        # A file message's caption may be emptied; a text message may not.
        is_file = message.message_type == MessageType.FILE
        self._validate(
            Draft(content, message.message_type, file_id=message_id if is_file else None)
        )
        edited = await self.store.edit(message_id, content, utcnow())
        if edited is None:
            raise NotFound("message not found", code="MESSAGE_NOT_FOUND")
        await self.publisher.publish(events.message_updated_event(edited))
        return edited

    async def delete(self, principal: Principal, message_id: str) -> Message:
        """The sender deletes a message: it leaves history, and its files become unreachable."""
        await self._own_live_message(principal, message_id)
        now = utcnow()
        deleted = await self.store.soft_delete(message_id, now)
        if deleted is None:
            raise NotFound("message not found", code="MESSAGE_NOT_FOUND")
        # Committed: the deletion stands and everyone hears of it, whatever the cleanup
        # below meets (a blob store outage is retried by the housekeeping job).
        await self.publisher.publish(events.message_deleted_event(deleted, now))
        for listener in self.delete_listeners:
            try:
                await listener(deleted)
            except Exception:
                log.exception("cleanup after deleting %s failed; it is retried later", message_id)
        return deleted

    async def _own_live_message(self, principal: Principal, message_id: str) -> Message:
        message = await self.store.by_message_id(message_id)
        if message is None:
            raise NotFound("message not found", code="MESSAGE_NOT_FOUND")
        # Membership first: a stranger learns nothing about the message, not even its sender.
        session, _ = await self.sessions.require_member(principal, message.session_id)
        if message.sender_type != SenderType.USER or message.sender_id != principal.user_id:
            raise Forbidden("only the sender can change or delete a message")
        require_writable(session)
        return message

    async def page(
        self,
        principal: Principal,
        session_id: str,
        *,
        before: str | None,
        after: str | None,
        limit: int,
    ) -> MessagePage:
        await self.sessions.require_member(principal, session_id)
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidInput(f"limit must be between 1 and {MAX_PAGE}")
        return await self.store.page(
            session_id, before=_cursor(before, "before"), after=_cursor(after, "after"), limit=limit
        )

    def _validate(self, draft: Draft) -> None:
        if draft.file_id is None and draft.message_type not in USER_MESSAGE_TYPES:
            raise InvalidInput("message_type must be 'text'")
        content = draft.content
        if not isinstance(content, str):
            raise InvalidInput("content must be a string")
        # A file is a message by itself; its caption may be empty.
        if not content.strip() and draft.file_id is None:
            raise InvalidInput("content is empty", code="EMPTY_CONTENT")
        if len(content) > self.max_content_bytes or len(content.encode()) > self.max_content_bytes:
            raise TooLarge(f"content is larger than {self.max_content_bytes} bytes")
        check_metadata(draft.metadata)
        cid = draft.client_msg_id
        if cid is not None and (
            not isinstance(cid, str) or not cid or len(cid) > MAX_CLIENT_MSG_ID
        ):
            raise InvalidInput(
                f"client_msg_id must be a string of 1-{MAX_CLIENT_MSG_ID} characters"
            )


def _cursor(raw: str | None, name: str) -> Cursor | None:
    if raw is None or raw == "":
        return None
    try:
        return Cursor.parse(raw)
    except ValueError as exc:
        raise InvalidInput(f"{name} must be a seq or an ISO 8601 time") from exc
