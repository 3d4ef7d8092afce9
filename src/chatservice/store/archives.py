"""Queries for archiving: which sessions need an archive, a snapshot, or ending."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import and_, not_, select, update

from chatservice.domain import WRITABLE_STATUSES, ArchiveState, Session, SessionStatus
from chatservice.store.database import Database
from chatservice.store.sessions import session_from_row
from chatservice.store.tables import chat_sessions

_s = chat_sessions


class ArchiveStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def record_archive(
        self,
        session_id: str,
        state: ArchiveState,
        *,
        text_key: str | None,
        json_key: str | None,
        now: datetime,
    ) -> bool:
        """Settle a pending archive; False when it was no longer pending (already done)."""
        async with self.db.write() as conn:
            result = await conn.execute(
                update(_s)
                .where(
                    _s.c.session_id == session_id,
                    _s.c.archive_state == ArchiveState.PENDING.value,
                )
                .values(
                    archive_state=state.value,
                    archive_key=text_key,
                    archive_json_key=json_key,
                    archived_at=now,
                )
            )
        return bool(result.rowcount)

    async def pending(self, ended_before: datetime, limit: int) -> list[str]:
        """Ended sessions whose archive was not written (the blob store failed then)."""
        query = (
            select(_s.c.session_id)
            .where(
                _s.c.archive_state == ArchiveState.PENDING.value,
                _s.c.status == SessionStatus.ARCHIVED.value,
                _s.c.ended_at < ended_before,
            )
            .order_by(_s.c.ended_at)
            .limit(limit)
        )
        async with self.db.read() as conn:
            return list((await conn.execute(query)).scalars())

    async def changed_since_snapshot(self, limit: int) -> list[Session]:
        """Live sessions with messages newer than their last snapshot."""
        query = (
            select(_s)
            .where(_s.c.status.in_(WRITABLE_STATUSES), _s.c.last_seq > _s.c.snapshot_seq)
            .order_by(_s.c.updated_at)
            .limit(limit)
        )
        async with self.db.read() as conn:
            return [session_from_row(row) for row in (await conn.execute(query)).all()]

    async def record_snapshot(self, session_id: str, seq: int) -> None:
        async with self.db.write() as conn:
            await conn.execute(
                update(_s)
                .where(_s.c.session_id == session_id, _s.c.snapshot_seq < seq)
                .values(snapshot_seq=seq)
            )

    async def reset_snapshot(self, session_id: str) -> None:
        """Make the session due for a fresh snapshot (its history changed in place)."""
        async with self.db.write() as conn:
            await conn.execute(
                update(_s).where(_s.c.session_id == session_id).values(snapshot_seq=0)
            )

    async def idle(self, quiet_since: datetime, limit: int) -> list[str]:
        """Live sessions with no activity since `quiet_since` (the consultation chat's
        abandoned rooms).

        A scheduled session is idle only once its scheduled time is that far past too.
        """
        not_yet_due = and_(
            _s.c.status == SessionStatus.SCHEDULED.value, _s.c.scheduled_at >= quiet_since
        )
        query = (
            select(_s.c.session_id)
            .where(
                _s.c.status.in_(WRITABLE_STATUSES),
                _s.c.updated_at < quiet_since,
                not_(not_yet_due),
            )
            .order_by(_s.c.updated_at)
            .limit(limit)
        )
        async with self.db.read() as conn:
            return list((await conn.execute(query)).scalars())
