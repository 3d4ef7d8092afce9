"""Storing messages: each with the session's next `seq`, plain ones group-committed.

A seq is taken by `UPDATE chat_sessions SET last_seq = last_seq + n … RETURNING` in the
transaction that inserts the messages: the session's row lock orders its writers, and a
rollback gives the numbers back, so seqs have no gaps and follow commit order.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import bindparam, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from chatservice.domain import WRITABLE_STATUSES, Message, SessionStatus, as_utc, utcnow
from chatservice.store.database import Database
from chatservice.store.message_rows import message_from_row, message_row
from chatservice.store.tables import chat_files, chat_messages, chat_sessions


class SessionNotWritable(Exception):
    """The session was ended or deleted before the message could be stored."""


class AlreadyAnswered(Exception):
    """The question was answered already (by an instance that held the agent lease)."""


class FileNotAttachable(Exception):
    """The file is unknown, deleted, of another session or already on a message."""


# Most messages one commit carries; more wait for the next one.
MAX_GROUP = 128


# On the hot path of every send: an IN over fixed values is an "expanding" parameter that
# SQLAlchemy re-renders on each execution; ORed equalities compile once and are cached.
_WRITABLE = or_(*(chat_sessions.c.status == status for status in WRITABLE_STATUSES))


def _take_seqs_statement(now: Any, *guards: Any, **values: Any) -> Any:
    s = chat_sessions
    return (
        update(s)
        .where(s.c.session_id == bindparam("take_session_id"), _WRITABLE, *guards)
        .values(
            last_seq=s.c.last_seq + bindparam("take_count"),
            updated_at=now,
            status=SessionStatus.ACTIVE.value,
            started_at=func.coalesce(s.c.started_at, now),
            **values,
        )
        .returning(s.c.last_seq, s.c.updated_at)
    )


# The plain case, on the hot path of every send, built once: a statement made per call
# costs SQLAlchemy more to construct and to key its compiled-SQL cache than SQLite takes to
# run it. SQLite is given the time from Python (see `_append_group`), PostgreSQL reads its
# own clock once the row lock is held.
_TAKE_SEQS_SQLITE = _take_seqs_statement(
    bindparam("take_now", type_=chat_sessions.c.updated_at.type)
)
_TAKE_SEQS_POSTGRES = _take_seqs_statement(func.clock_timestamp())


async def _take_seqs(
    conn: AsyncConnection, session_id: str, count: int, now: Any, *guards: Any, **values: Any
) -> Any:
    """Move a writable session's `last_seq` on by `count` under its row lock; returns the
    row (`last_seq`, `updated_at`), or None when the session is not writable or a guard
    does not hold. `now` is a datetime (SQLite) or None (PostgreSQL's clock)."""
    params: dict[str, Any] = {"take_session_id": session_id, "take_count": count}
    if guards or values:
        statement = _take_seqs_statement(
            func.clock_timestamp() if now is None else now, *guards, **values
        )
    elif now is None:
        statement = _TAKE_SEQS_POSTGRES
    else:
        statement = _TAKE_SEQS_SQLITE
        params["take_now"] = now
    return (await conn.execute(statement, params)).first()


async def _is_writable(conn: AsyncConnection, session_id: str) -> bool:
    s = chat_sessions
    status = (
        await conn.execute(select(s.c.status).where(s.c.session_id == session_id))
    ).scalar_one_or_none()
    return status in WRITABLE_STATUSES


class MessageWriter:
    def __init__(self, db: Database) -> None:
        self.db = db
        # Group commit: appends that arrive while a commit is under way wait here and are
        # stored together by the next one (one transaction, one round trip per statement
        # kind), instead of one transaction each.
        self._queued: list[tuple[Message, asyncio.Future[tuple[Message, bool]]]] = []
        self._committer: asyncio.Task[None] | None = None

    async def append(
        self,
        message: Message,
        *,
        answers_seq: int | None = None,
        attach_file_id: str | None = None,
    ) -> tuple[Message, bool]:
        """Store `message` with the session's next seq; returns (stored, created) once the
        transaction that holds it has committed.

        Plain messages are group-committed with whatever else is waiting (see
        `_append_group`); an agent answer (`answers_seq`) or a file message
        (`attach_file_id`) has a transaction of its own (`_append_alone`).
        """
        if answers_seq is not None or attach_file_id is not None:
            return await self._append_alone(
                message, answers_seq=answers_seq, attach_file_id=attach_file_id
            )
        done: asyncio.Future[tuple[Message, bool]] = asyncio.get_running_loop().create_future()
        self._queued.append((message, done))
        if self._committer is None:
            self._committer = asyncio.create_task(self._commit_queued(), name="group-commit")
        return await done

    async def _commit_queued(self) -> None:
        group: list[tuple[Message, asyncio.Future[tuple[Message, bool]]]] = []
        try:
            while self._queued:
                group, self._queued = self._queued[:MAX_GROUP], self._queued[MAX_GROUP:]
                messages = [message for message, _ in group]
                try:
                    await self._append_group(messages)
                except Exception:
                    # One bad message (a reused client_msg_id, a session just ended) fails
                    # the whole group's transaction: store each alone, so only it fails.
                    for message, done in group:
                        try:
                            result = await self._append_alone(message)
                        except Exception as exc:
                            if not done.done():
                                done.set_exception(exc)
                        else:
                            if not done.done():
                                done.set_result(result)
                    continue
                for message, done in group:
                    if not done.done():
                        done.set_result((message, True))
        finally:
            # Cancelled mid-commit (shutdown): nobody may wait forever on its outcome.
            for _, done in group:
                if not done.done():
                    done.cancel()
            self._committer = None

    async def _append_group(self, messages: list[Message]) -> None:
        """Store plain messages in one transaction: per session one `UPDATE … last_seq =
        last_seq + n RETURNING`, which numbers its messages in arrival order, then one
        multi-row INSERT for all. Any failure rolls the whole group back (seqs included)."""
        by_session: dict[str, list[Message]] = {}
        for message in messages:
            by_session.setdefault(message.session_id, []).append(message)
        async with self.db.write() as conn:
            now = utcnow() if self.db.is_sqlite else None
            # Sessions in one order on every instance: two groups locking the same rows in
            # opposite orders would deadlock on PostgreSQL.
            for session_id in sorted(by_session):
                own = by_session[session_id]
                row = await _take_seqs(conn, session_id, len(own), now)
                if row is None:
                    raise SessionNotWritable(session_id)
                first = row.last_seq - len(own) + 1
                created_at = as_utc(row.updated_at)
                for offset, message in enumerate(own):
                    message.seq = first + offset
                    message.created_at = created_at
            await conn.execute(insert(chat_messages), [message_row(m) for m in messages])

    async def _append_alone(
        self,
        message: Message,
        *,
        answers_seq: int | None = None,
        attach_file_id: str | None = None,
    ) -> tuple[Message, bool]:
        """Store `message` with the session's next seq, in a transaction of its own.

        The seq comes from `UPDATE chat_sessions SET last_seq = last_seq + 1 … RETURNING`
        in the same transaction as the INSERT: the row lock orders concurrent writers of
        one session, and a rollback gives the number back, so seqs have no gaps.
        `answers_seq`: an agent's answer records which user message it answered, in the
        same transaction, so the answer queue survives restarts and instances.
        `attach_file_id`: a file message takes its file in the same transaction, so a file
        is on exactly one message and a failed send leaves it free.
        A `client_msg_id` the sender already used returns the original instead: the
        unique constraint rejects the insert (rolling the seq back) and the original is
        read, so the common case costs no extra lookup.
        """
        try:
            async with self.db.write() as conn:
                # The time is read once the session row is ours, so created_at follows seq
                # order (time cursors and seq cursors must page the same history). On
                # PostgreSQL the database clock is read after the lock wait; SQLite's
                # writers are already serialised by the in-process write lock.
                now = utcnow() if self.db.is_sqlite else None
                s = chat_sessions
                answering = answers_seq is not None
                row = await _take_seqs(
                    conn,
                    message.session_id,
                    1,
                    now,
                    # One stored answer per question, whoever holds the agent lease: an
                    # instance that lost it during a stall finds the question answered.
                    *([s.c.agent_answered_seq < answers_seq] if answering else []),
                    **({"agent_answered_seq": answers_seq} if answering else {}),
                )
                if row is None:
                    if answering and await _is_writable(conn, message.session_id):
                        raise AlreadyAnswered(message.session_id)
                    raise SessionNotWritable(message.session_id)
                message.seq = row.last_seq
                message.created_at = as_utc(row.updated_at)
                await conn.execute(insert(chat_messages).values(**message_row(message)))
                if attach_file_id is not None:
                    f = chat_files
                    taken = await conn.execute(
                        update(f)
                        .where(
                            f.c.file_id == attach_file_id,
                            f.c.session_id == message.session_id,
                            f.c.message_id.is_(None),
                            f.c.deleted_at.is_(None),
                        )
                        .values(message_id=message.message_id)
                    )
                    if taken.rowcount != 1:
                        raise FileNotAttachable(attach_file_id)
        except IntegrityError:
            if message.client_msg_id is not None:
                original = await self.by_client_msg_id(
                    message.session_id, message.sender_id, message.client_msg_id
                )
                if original is not None:
                    return original, False
            raise
        return message, True

    async def by_client_msg_id(
        self, session_id: str, sender_id: str, client_msg_id: str
    ) -> Message | None:
        m = chat_messages
        async with self.db.read() as conn:
            row = (
                await conn.execute(
                    select(m).where(
                        m.c.session_id == session_id,
                        m.c.sender_id == sender_id,
                        m.c.client_msg_id == client_msg_id,
                    )
                )
            ).first()
        return message_from_row(row) if row else None
