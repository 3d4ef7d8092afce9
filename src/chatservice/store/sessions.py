"""Queries about sessions, their participants and agents."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, delete, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError

from chatservice.domain import (
    WRITABLE_STATUSES,
    Agent,
    Participant,
    Session,
    SessionDetail,
    SessionSummary,
)
from chatservice.store.database import Database
from chatservice.store.message_rows import VISIBLE, visible_count
from chatservice.store.tables import agents, chat_messages, chat_participants, chat_sessions


def session_from_row(row: Any) -> Session:
    return Session(
        session_id=row.session_id,
        trace_id=row.trace_id,
        user_id=row.user_id,
        kind=row.kind,
        status=row.status,
        title=row.title,
        agent_id=row.agent_id,
        metadata=row.meta,
        created_at=row.created_at,
        updated_at=row.updated_at,
        last_seq=row.last_seq,
        started_at=row.started_at,
        ended_at=row.ended_at,
        scheduled_at=row.scheduled_at,
        archive_state=row.archive_state,
        archive_key=row.archive_key,
        archive_json_key=row.archive_json_key,
        archived_at=row.archived_at,
        snapshot_seq=row.snapshot_seq,
    )


def _participant_from_row(row: Any) -> Participant:
    return Participant(
        session_id=row.session_id,
        user_id=row.user_id,
        role=row.role,
        joined_at=row.joined_at,
        last_read_seq=row.last_read_seq,
        display_name=row.display_name,
    )


class SessionStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def create(
        self, session: Session, participants: Sequence[Participant], direct_key: str | None
    ) -> tuple[Session, bool]:
        """Insert the session and its members; for a direct pair that exists, return it."""
        values = {
            "session_id": session.session_id,
            "trace_id": session.trace_id,
            "user_id": session.user_id,
            "agent_id": session.agent_id,
            "kind": session.kind,
            "title": session.title,
            "status": session.status,
            "meta": session.metadata,
            "direct_key": direct_key,
            "created_at": session.created_at,
            "updated_at": session.updated_at,
            "scheduled_at": session.scheduled_at,
        }
        if direct_key is not None:
            existing = await self.find_direct(direct_key)
            if existing is not None:
                return existing, False
        try:
            async with self.db.write() as conn:
                await conn.execute(insert(chat_sessions).values(**values))
                await conn.execute(
                    insert(chat_participants),
                    [
                        {
                            "session_id": p.session_id,
                            "user_id": p.user_id,
                            "role": p.role,
                            "display_name": p.display_name,
                            "joined_at": p.joined_at,
                            "last_read_seq": 0,
                        }
                        for p in participants
                    ],
                )
        except IntegrityError:
            # Two requests for the same direct pair raced; the loser returns the winner's.
            if direct_key is not None:
                existing = await self.find_direct(direct_key)
                if existing is not None:
                    return existing, False
            raise
        return session, True

    async def get(self, session_id: str) -> Session | None:
        async with self.db.read() as conn:
            row = (
                await conn.execute(
                    select(chat_sessions).where(chat_sessions.c.session_id == session_id)
                )
            ).first()
        return session_from_row(row) if row else None

    async def find_direct(self, direct_key: str) -> Session | None:
        async with self.db.read() as conn:
            row = (
                await conn.execute(
                    select(chat_sessions).where(chat_sessions.c.direct_key == direct_key)
                )
            ).first()
        return session_from_row(row) if row else None

    async def membership(
        self, session_id: str, user_id: str
    ) -> tuple[Session | None, Participant | None]:
        """The session and the user's membership in it, in one round trip."""
        query = (
            select(
                chat_sessions,
                chat_participants.c.role,
                chat_participants.c.joined_at.label("p_joined_at"),
                chat_participants.c.last_read_seq,
                chat_participants.c.display_name,
                chat_participants.c.user_id.label("p_user_id"),
            )
            .select_from(
                chat_sessions.outerjoin(
                    chat_participants,
                    and_(
                        chat_participants.c.session_id == chat_sessions.c.session_id,
                        chat_participants.c.user_id == user_id,
                    ),
                )
            )
            .where(chat_sessions.c.session_id == session_id)
        )
        async with self.db.read() as conn:
            row = (await conn.execute(query)).first()
        if row is None:
            return None, None
        session = session_from_row(row)
        if row.p_user_id is None:
            return session, None
        return session, Participant(
            session_id=session_id,
            user_id=user_id,
            role=row.role,
            joined_at=row.p_joined_at,
            last_read_seq=row.last_read_seq,
            display_name=row.display_name,
        )

    async def list_for_user(
        self,
        user_id: str,
        *,
        statuses: Sequence[str],
        agent_id: int | None,
        limit: int,
        offset: int,
    ) -> tuple[list[SessionSummary], int]:
        s, p, m = chat_sessions, chat_participants, chat_messages
        latest = (
            select(m.c.content, m.c.created_at)
            .where(m.c.session_id == s.c.session_id, VISIBLE)
            .order_by(m.c.seq.desc())
            .limit(1)
        )
        unread = (
            select(func.count())
            .select_from(m)
            .where(
                m.c.session_id == s.c.session_id,
                m.c.seq > p.c.last_read_seq,
                m.c.sender_id != user_id,
                VISIBLE,
            )
            .scalar_subquery()
        )
        conditions = [p.c.user_id == user_id, s.c.status.in_(list(statuses))]
        if agent_id is not None:
            conditions.append(s.c.agent_id == agent_id)
        joined = s.join(p, p.c.session_id == s.c.session_id)
        query = (
            select(
                s,
                agents.c.name.label("agent_name"),
                latest.with_only_columns(m.c.content).scalar_subquery().label("last_message"),
                latest.with_only_columns(m.c.created_at).scalar_subquery().label("last_at"),
                unread.label("unread_count"),
            )
            .select_from(joined.outerjoin(agents, agents.c.id == s.c.agent_id))
            .where(*conditions)
            .order_by(s.c.updated_at.desc(), s.c.id.desc())
            .limit(limit)
            .offset(offset)
        )
        count = select(func.count()).select_from(joined).where(*conditions)
        async with self.db.read() as conn:
            rows = (await conn.execute(query)).all()
            total = (await conn.execute(count)).scalar_one()
        return [
            SessionSummary(
                session=session_from_row(row),
                agent_name=row.agent_name,
                last_message=row.last_message,
                last_message_at=row.last_at,
                unread_count=row.unread_count,
            )
            for row in rows
        ], total

    async def detail(self, session: Session) -> SessionDetail:
        m = chat_messages
        async with self.db.read() as conn:
            members = (
                await conn.execute(
                    select(chat_participants)
                    .where(chat_participants.c.session_id == session.session_id)
                    .order_by(chat_participants.c.joined_at, chat_participants.c.user_id)
                )
            ).all()
            # Neither reads the session's messages: a count and a max over them grow
            # with the session, these are index probes.
            count = (await conn.execute(visible_count(session.session_id))).scalar_one_or_none()
            newest = (
                await conn.execute(
                    select(m.c.created_at)
                    .where(m.c.session_id == session.session_id, VISIBLE)
                    .order_by(m.c.seq.desc())
                    .limit(1)
                )
            ).scalar_one_or_none()
            agent = await self._agent(conn, session.agent_id)
        return SessionDetail(
            session=session,
            agent=agent,
            participants=[_participant_from_row(row) for row in members],
            message_count=count or 0,
            last_activity=newest or session.updated_at,
        )

    async def participant_ids(self, session_id: str) -> list[str]:
        """Who takes part in a session (whatever its status), without the detail's counts."""
        p = chat_participants
        async with self.db.read() as conn:
            rows = (
                await conn.execute(select(p.c.user_id).where(p.c.session_id == session_id))
            ).all()
        return [row.user_id for row in rows]

    async def get_agent(self, agent_id: int) -> Agent | None:
        async with self.db.read() as conn:
            return await self._agent(conn, agent_id)

    @staticmethod
    async def _agent(conn: Any, agent_id: int | None) -> Agent | None:
        if agent_id is None:
            return None
        row = (await conn.execute(select(agents).where(agents.c.id == agent_id))).first()
        if row is None:
            return None
        return Agent(id=row.id, name=row.name, avatar_url=row.avatar_url, backend=row.backend)

    async def set_status(
        self,
        session_id: str,
        status: str,
        *,
        now: datetime,
        only_from: Sequence[str],
        ended: bool = False,
        quiet_since: datetime | None = None,
    ) -> Session | None:
        """Move the session to `status` if it is in `only_from` (and, with `quiet_since`,
        had no activity since then); None when it was not."""
        values: dict[str, Any] = {"status": status, "updated_at": now}
        if ended:
            values["ended_at"] = now
            values["archive_state"] = "pending"
        if status not in WRITABLE_STATUSES:
            # A direct pair has one *live* session; once it ends or is deleted the pair may
            # start a new one, so the key moves on.
            values["direct_key"] = None
        async with self.db.write() as conn:
            row = (
                await conn.execute(
                    update(chat_sessions)
                    .where(
                        chat_sessions.c.session_id == session_id,
                        chat_sessions.c.status.in_(list(only_from)),
                        *(
                            ()
                            if quiet_since is None
                            else (chat_sessions.c.updated_at < quiet_since,)
                        ),
                    )
                    .values(**values)
                    .returning(*chat_sessions.c)
                )
            ).first()
        return session_from_row(row) if row else None

    async def mark_read(self, session_id: str, user_id: str, seq: int) -> int:
        """Raise the user's read watermark to `seq` (never lower it); returns the new one."""
        p = chat_participants
        async with self.db.write() as conn:
            await conn.execute(
                update(p)
                .where(
                    p.c.session_id == session_id, p.c.user_id == user_id, p.c.last_read_seq < seq
                )
                .values(last_read_seq=seq)
            )
            return int(
                (
                    await conn.execute(
                        select(p.c.last_read_seq).where(
                            p.c.session_id == session_id, p.c.user_id == user_id
                        )
                    )
                ).scalar_one()
            )

    async def add_participants(
        self, session_id: str, user_ids: Sequence[str], now: datetime
    ) -> list[str]:
        """Add the users who are not members yet; returns those actually added."""
        p = chat_participants
        dialect_insert = sqlite_insert if self.db.is_sqlite else pg_insert
        statement = (
            dialect_insert(p)
            .values(
                [
                    {
                        "session_id": session_id,
                        "user_id": uid,
                        "role": "member",
                        "joined_at": now,
                        "last_read_seq": 0,
                    }
                    for uid in user_ids
                ]
            )
            # Concurrent adds of the same person: one wins, the others add nobody.
            .on_conflict_do_nothing()
            .returning(p.c.user_id)
        )
        async with self.db.write() as conn:
            inserted = set((await conn.execute(statement)).scalars())
        return [uid for uid in user_ids if uid in inserted]

    async def remove_participant(self, session_id: str, user_id: str) -> bool:
        p = chat_participants
        async with self.db.write() as conn:
            result = await conn.execute(
                delete(p).where(p.c.session_id == session_id, p.c.user_id == user_id)
            )
        return bool(result.rowcount)

    async def set_display_name(self, session_id: str, user_id: str, name: str) -> None:
        p = chat_participants
        async with self.db.write() as conn:
            await conn.execute(
                update(p)
                .where(p.c.session_id == session_id, p.c.user_id == user_id)
                .values(display_name=name)
            )

    async def unread_count(self, session_id: str, user_id: str, after_seq: int) -> int:
        m = chat_messages
        async with self.db.read() as conn:
            return int(
                (
                    await conn.execute(
                        select(func.count()).where(
                            m.c.session_id == session_id,
                            m.c.seq > after_seq,
                            m.c.sender_id != user_id,
                            VISIBLE,
                        )
                    )
                ).scalar_one()
            )
