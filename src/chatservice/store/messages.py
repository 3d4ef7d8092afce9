"""Reading and changing stored messages: pages, replay, the agent's queue, edits and
deletions. Appending is `store/message_writer.py`'s, reached through `MessageStore.append`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update

from chatservice.domain import WRITABLE_STATUSES, Cursor, Message, MessagePage, as_utc
from chatservice.store.database import Database
from chatservice.store.message_rows import VISIBLE, message_from_row, visible_count
from chatservice.store.message_writer import MessageWriter
from chatservice.store.tables import chat_messages, chat_sessions

# Above any seq a session can reach (the column is a 32-bit integer).
_BEYOND_EVERY_SEQ = 2**31 - 1


def _seq_bound(session_id: str, moment: datetime, newer: bool) -> Any:
    """A time cursor as a bound on seq: `created_at > moment` (newer) or `< moment`.

    Within a session `created_at` follows seq order (the time is read under the session's
    row lock), so the bound selects the same messages as filtering on the time; but it is
    one probe of the (session, created_at, seq) index, where the filter is applied to every
    row the seq index walks past on the way to the page.
    """
    m = chat_messages
    mine = m.c.session_id == session_id
    if newer:
        last_before = (
            select(m.c.seq)
            .where(mine, m.c.created_at <= moment)
            .order_by(m.c.created_at.desc(), m.c.seq.desc())
            .limit(1)
            .scalar_subquery()
        )
        return m.c.seq > func.coalesce(last_before, 0)
    first_after = (
        select(m.c.seq)
        .where(mine, m.c.created_at >= moment)
        .order_by(m.c.created_at, m.c.seq)
        .limit(1)
        .scalar_subquery()
    )
    return m.c.seq < func.coalesce(first_after, _BEYOND_EVERY_SEQ)


class MessageStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.writer = MessageWriter(db)

    async def append(
        self,
        message: Message,
        *,
        answers_seq: int | None = None,
        attach_file_id: str | None = None,
    ) -> tuple[Message, bool]:
        """Store `message` with the session's next seq (`MessageWriter.append`)."""
        return await self.writer.append(
            message, answers_seq=answers_seq, attach_file_id=attach_file_id
        )

    async def after_seq(self, session_id: str, after: int, limit: int) -> list[Message]:
        """Messages with seq > `after`, oldest first: replay for `since_seq`."""
        m = chat_messages
        async with self.db.read() as conn:
            rows = (
                await conn.execute(
                    select(m)
                    .where(m.c.session_id == session_id, m.c.seq > after, VISIBLE)
                    .order_by(m.c.seq)
                    .limit(limit)
                )
            ).all()
        return [message_from_row(row) for row in rows]

    async def page(
        self, session_id: str, *, before: Cursor | None, after: Cursor | None, limit: int
    ) -> MessagePage:
        """A page in ascending seq order.

        A cursor is a seq or a time. No cursor: the newest `limit` messages; `before`: the
        newest `limit` before it; `after`: the first `limit` after it; both: the first
        `limit` between them. `has_more` says whether more messages lie beyond the page in
        the direction of travel (older without `after`, newer with it).
        """
        m = chat_messages
        conditions: list[Any] = [m.c.session_id == session_id, VISIBLE]
        for cursor, newer in ((after, True), (before, False)):
            if cursor is None:
                continue
            if cursor.seq is not None:
                conditions.append(m.c.seq > cursor.seq if newer else m.c.seq < cursor.seq)
            elif cursor.moment is not None:
                conditions.append(_seq_bound(session_id, as_utc(cursor.moment), newer))
        # Walking forward only when the caller gave `after`; otherwise newest first.
        forward = after is not None
        order = m.c.seq.asc() if forward else m.c.seq.desc()
        async with self.db.read() as conn:
            rows = (
                await conn.execute(select(m).where(*conditions).order_by(order).limit(limit + 1))
            ).all()
            total = (await conn.execute(visible_count(session_id))).scalar_one_or_none() or 0
        has_more = len(rows) > limit
        rows = list(rows[:limit])
        if not forward:
            rows.reverse()
        return MessagePage(
            messages=[message_from_row(row) for row in rows], has_more=has_more, total=total
        )

    async def pages(self, session_id: str, page_size: int = 1000) -> AsyncIterator[list[Message]]:
        """Every visible message of the session, oldest first, a page at a time (one
        query per page, so a long session does not hold a database connection long)."""
        m = chat_messages
        after = 0
        while True:
            async with self.db.read() as conn:
                rows = (
                    await conn.execute(
                        select(m)
                        .where(m.c.session_id == session_id, m.c.seq > after, VISIBLE)
                        .order_by(m.c.seq)
                        .limit(page_size)
                    )
                ).all()
            if not rows:
                return
            page = [message_from_row(row) for row in rows]
            after = page[-1].seq
            yield page
            if len(rows) < page_size:
                return

    async def edit(self, message_id: str, content: str, now: datetime) -> Message | None:
        """Replace a live message's content; None when it is gone."""
        m = chat_messages
        async with self.db.write() as conn:
            row = (
                await conn.execute(
                    update(m)
                    .where(m.c.message_id == message_id, VISIBLE)
                    .values(content=content, is_edited=True, edited_at=now)
                    .returning(*m.c)
                )
            ).first()
        return message_from_row(row) if row else None

    async def soft_delete(self, message_id: str, now: datetime) -> Message | None:
        """Hide a message from history; None when it was already gone."""
        m = chat_messages
        async with self.db.write() as conn:
            row = (
                await conn.execute(
                    update(m)
                    .where(m.c.message_id == message_id, VISIBLE)
                    .values(deleted_at=now)
                    .returning(*m.c)
                )
            ).first()
        return message_from_row(row) if row else None

    async def by_message_id(self, message_id: str) -> Message | None:
        m = chat_messages
        async with self.db.read() as conn:
            row = (await conn.execute(select(m).where(m.c.message_id == message_id))).first()
        return message_from_row(row) if row else None

    async def sessions_with_unanswered(self, limit: int) -> list[str]:
        """Live agent sessions with a user message newer than the last one answered."""
        m, s = chat_messages, chat_sessions
        waiting = (
            select(m.c.id)
            .where(
                m.c.session_id == s.c.session_id,
                m.c.sender_type == "user",
                m.c.seq > s.c.agent_answered_seq,
                VISIBLE,
            )
            .exists()
        )
        query = (
            select(s.c.session_id)
            .where(s.c.kind == "agent", s.c.status.in_(WRITABLE_STATUSES), waiting)
            .order_by(s.c.id)
            .limit(limit)
        )
        async with self.db.read() as conn:
            return list((await conn.execute(query)).scalars())

    async def next_unanswered(self, session_id: str) -> Message | None:
        """The oldest user message after the last one the session's agent answered."""
        m, s = chat_messages, chat_sessions
        answered = (
            select(s.c.agent_answered_seq).where(s.c.session_id == session_id).scalar_subquery()
        )
        async with self.db.read() as conn:
            row = (
                await conn.execute(
                    select(m)
                    .where(
                        m.c.session_id == session_id,
                        m.c.sender_type == "user",
                        m.c.seq > answered,
                        VISIBLE,
                    )
                    .order_by(m.c.seq)
                    .limit(1)
                )
            ).first()
        return message_from_row(row) if row else None

    async def recent(self, session_id: str, up_to_seq: int, limit: int) -> list[Message]:
        """The `limit` newest messages with seq <= `up_to_seq`, oldest first."""
        m = chat_messages
        async with self.db.read() as conn:
            rows = (
                await conn.execute(
                    select(m)
                    .where(m.c.session_id == session_id, m.c.seq <= up_to_seq, VISIBLE)
                    .order_by(m.c.seq.desc())
                    .limit(limit)
                )
            ).all()
        return [message_from_row(row) for row in reversed(rows)]

    async def last_seq(self, session_id: str) -> int:
        async with self.db.read() as conn:
            value = (
                await conn.execute(
                    select(chat_sessions.c.last_seq).where(chat_sessions.c.session_id == session_id)
                )
            ).scalar_one_or_none()
        return int(value or 0)
