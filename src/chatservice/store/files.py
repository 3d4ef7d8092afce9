"""Queries about uploaded files (`chat_files`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import delete, select, update

from chatservice.domain import FileRecord, as_utc
from chatservice.store.database import Database
from chatservice.store.tables import chat_files, chat_messages

_f = chat_files


def file_from_row(row: Any) -> FileRecord:
    message_deleted = getattr(row, "message_deleted_at", None) is not None
    return FileRecord(
        file_id=row.file_id,
        session_id=row.session_id,
        file_name=row.file_name,
        file_type=row.file_type,
        file_size=row.file_size,
        storage_key=row.storage_key,
        thumbnail_key=row.thumbnail_key,
        uploaded_by=row.uploaded_by,
        uploaded_at=as_utc(row.uploaded_at),
        message_id=row.message_id,
        deleted=row.deleted_at is not None or message_deleted,
    )


def _with_message_state() -> Any:
    # A file is gone once its message is deleted: reading both in one query keeps the
    # download check to a single round trip.
    return select(_f, chat_messages.c.deleted_at.label("message_deleted_at")).select_from(
        _f.outerjoin(chat_messages, chat_messages.c.message_id == _f.c.message_id)
    )


class FileStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def insert(self, record: FileRecord) -> None:
        async with self.db.write() as conn:
            await conn.execute(
                _f.insert().values(
                    file_id=record.file_id,
                    session_id=record.session_id,
                    message_id=record.message_id,
                    file_name=record.file_name,
                    file_type=record.file_type,
                    file_size=record.file_size,
                    file_url=record.url,
                    thumbnail_url=record.thumbnail_url,
                    storage_key=record.storage_key,
                    thumbnail_key=record.thumbnail_key,
                    uploaded_by=record.uploaded_by,
                    uploaded_at=record.uploaded_at,
                )
            )

    async def get(self, file_id: str) -> FileRecord | None:
        async with self.db.read() as conn:
            row = (await conn.execute(_with_message_state().where(_f.c.file_id == file_id))).first()
        return file_from_row(row) if row else None

    async def for_session(self, session_id: str) -> list[FileRecord]:
        """The session's live files that a message carries, oldest first (transcripts)."""
        query = (
            _with_message_state()
            .where(
                _f.c.session_id == session_id,
                _f.c.message_id.is_not(None),
                _f.c.deleted_at.is_(None),
            )
            .order_by(_f.c.id)
        )
        async with self.db.read() as conn:
            rows = (await conn.execute(query)).all()
        return [f for f in map(file_from_row, rows) if not f.deleted]

    async def mark_deleted_for_message(self, message_id: str, now: datetime) -> list[FileRecord]:
        """Soft-delete the files a message carries; returns them so their blobs can go."""
        async with self.db.write() as conn:
            rows = (
                await conn.execute(
                    update(_f)
                    .where(_f.c.message_id == message_id, _f.c.deleted_at.is_(None))
                    .values(deleted_at=now)
                    .returning(*_f.c)
                )
            ).all()
        return [file_from_row(row) for row in rows]

    async def mark_blobs_removed(self, file_id: str, now: datetime) -> None:
        async with self.db.write() as conn:
            await conn.execute(
                update(_f).where(_f.c.file_id == file_id).values(blobs_removed_at=now)
            )

    async def blobs_to_remove(self, limit: int) -> list[FileRecord]:
        """Deleted files whose blobs are still in the blob store (it was down then)."""
        query = (
            select(_f)
            .where(_f.c.deleted_at.is_not(None), _f.c.blobs_removed_at.is_(None))
            .order_by(_f.c.id)
            .limit(limit)
        )
        async with self.db.read() as conn:
            rows = (await conn.execute(query)).all()
        return [file_from_row(row) for row in rows]

    async def remove_unattached(self, file_id: str) -> bool:
        """Delete the row of an upload no message carries; False if one took it meanwhile."""
        async with self.db.write() as conn:
            result = await conn.execute(
                delete(_f).where(_f.c.file_id == file_id, _f.c.message_id.is_(None))
            )
        return bool(result.rowcount)

    async def unattached_before(self, moment: datetime, limit: int) -> list[FileRecord]:
        """Uploads no message took up in time (`attach=false` left dangling)."""
        query = (
            select(_f)
            .where(_f.c.message_id.is_(None), _f.c.uploaded_at < moment)
            .order_by(_f.c.id)
            .limit(limit)
        )
        async with self.db.read() as conn:
            rows = (await conn.execute(query)).all()
        return [file_from_row(row) for row in rows]
