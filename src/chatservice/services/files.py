"""Files: checking and storing uploads, thumbnails, attaching them to messages, downloads.

An upload is judged on its content (magic bytes), not on what the client declares; images
are fully decoded once, off the event loop, which both refuses corrupt files and bombs and
yields the thumbnail. Blobs are written before the database row, and the row before the
message, so whatever a client can see always has its bytes in the store.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import BinaryIO

from chatservice.blobs.base import BlobStore
from chatservice.domain import (
    FileRecord,
    Message,
    MessageType,
    Principal,
    Session,
    new_id,
    utcnow,
)
from chatservice.media.names import sanitise_filename
from chatservice.media.sniff import HEAD_BYTES, FileTypeRefused, judge_type
from chatservice.media.thumbnails import IMAGE_TYPES, ImageRefused, Thumbnail, make_thumbnail
from chatservice.services.errors import (
    Conflict,
    InvalidInput,
    NotFound,
    TooLarge,
    UnsupportedMediaType,
)
from chatservice.services.messages import Draft, MessageService
from chatservice.services.sessions import SessionService, require_writable
from chatservice.store.files import FileStore

log = logging.getLogger(__name__)

MAX_CAPTION_CHARS = 4000
# Decoding an image takes memory in proportion to its pixels; a couple at a time keeps
# a burst of uploads from multiplying that.
THUMBNAIL_WORKERS = 2
# Writing a blob to S3 holds one part (8 MiB) in memory; this bounds how many at once
# (bench/README.md: without it, 20 uploads in flight took ~190 MiB).
BLOB_WRITERS = 4


@dataclass(slots=True, frozen=True)
class FileLimits:
    max_size: int
    allowed_types: frozenset[str]
    thumbnail_side: int
    max_image_pixels: int


@dataclass(slots=True)
class Upload:
    """The file part of a request, already spooled (memory, then disk) by the transport."""

    name: str | None
    declared_type: str | None
    source: BinaryIO
    size: int


@dataclass(slots=True, frozen=True)
class Download:
    key: str
    size: int
    content_type: str
    file_name: str
    etag: str


def _judge(source: BinaryIO, declared: str | None, limits: FileLimits) -> str:
    source.seek(0)
    head = source.read(HEAD_BYTES)
    source.seek(0)
    return judge_type(head, declared, limits.allowed_types)


def _thumbnail(source: BinaryIO, limits: FileLimits) -> Thumbnail:
    source.seek(0)
    try:
        return make_thumbnail(
            source, max_side=limits.thumbnail_side, max_pixels=limits.max_image_pixels
        )
    finally:
        source.seek(0)


class FileService:
    def __init__(
        self,
        sessions: SessionService,
        messages: MessageService,
        store: FileStore,
        blobs: BlobStore,
        limits: FileLimits,
    ) -> None:
        self.sessions = sessions
        self.messages = messages
        self.store = store
        self.blobs = blobs
        self.limits = limits
        self._decoders = asyncio.Semaphore(THUMBNAIL_WORKERS)
        self._writers = asyncio.Semaphore(BLOB_WRITERS)

    async def check_can_upload(self, principal: Principal, session_id: str) -> Session:
        """Everything that can refuse an upload before its body is read: membership, a
        writable session, the sender's rate budget (an upload counts as one send)."""
        session, _ = await self.sessions.require_member(principal, session_id)
        require_writable(session)
        await self.messages.check_rate(principal)
        return session

    async def upload(
        self,
        principal: Principal,
        session: Session,
        upload: Upload,
        *,
        caption: str | None,
        attach: bool,
        client_msg_id: str | None = None,
    ) -> tuple[FileRecord, Message | None]:
        """Store the file and (with `attach`) send the file message carrying it."""
        caption = _check_caption(caption)
        if upload.size > self.limits.max_size:
            raise TooLarge(f"file is larger than {self.limits.max_size} bytes")
        try:
            file_type = await asyncio.to_thread(
                _judge, upload.source, upload.declared_type, self.limits
            )
        except FileTypeRefused as exc:
            if exc.code == "EMPTY_FILE":
                raise InvalidInput(exc.message, code=exc.code) from exc
            raise UnsupportedMediaType(exc.message, code=exc.code) from exc
        thumbnail = None
        if file_type in IMAGE_TYPES:
            async with self._decoders:
                try:
                    thumbnail = await asyncio.to_thread(_thumbnail, upload.source, self.limits)
                except ImageRefused as exc:
                    raise InvalidInput(exc.message, code=exc.code) from exc
        file_id = new_id("file")
        base = f"files/{session.session_id}/{file_id}"
        record = FileRecord(
            file_id=file_id,
            session_id=session.session_id,
            file_name=sanitise_filename(upload.name),
            file_type=file_type,
            file_size=upload.size,
            storage_key=base,
            thumbnail_key=_thumbnail_key(base, thumbnail) if thumbnail else None,
            uploaded_by=principal.user_id,
            uploaded_at=utcnow(),
        )
        try:
            async with self._writers:
                record.file_size = await self.blobs.put_stream(base, upload.source, file_type)
            if thumbnail is not None and record.thumbnail_key:
                await self.blobs.put_bytes(
                    record.thumbnail_key, thumbnail.data, thumbnail.content_type
                )
            await self.store.insert(record)
        except BaseException:
            await self._discard(record)
            raise
        if not attach:
            return record, None
        try:
            result = await self.messages.send_as_member(
                principal,
                session,
                self._file_draft(record, caption, client_msg_id, rate_limited=False),
            )
        except BaseException:
            await self._discard(record, in_store=True)
            raise
        if not result.created:
            # A retried upload (same client_msg_id): answer with the original's file.
            await self._discard(record, in_store=True)
            original = await self._file_of(result.message)
            if original is None:
                raise Conflict(
                    "client_msg_id was already used for a message without a file",
                    code="CLIENT_MSG_ID_REUSED",
                )
            return original, result.message
        record.message_id = result.message.message_id
        return record, result.message

    async def attach(
        self,
        principal: Principal,
        session: Session,
        file_id: str,
        caption: str | None,
        client_msg_id: str | None = None,
    ) -> Message:
        """Send a message carrying a file the caller uploaded earlier with `attach=false`."""
        caption = _check_caption(caption)
        record = await self.store.get(file_id)
        if record is None or record.deleted or record.session_id != session.session_id:
            raise NotFound("file not found in this session", code="FILE_NOT_FOUND")
        if record.uploaded_by != principal.user_id:
            raise Conflict("only the uploader can attach a file", code="FILE_NOT_ATTACHABLE")
        result = await self.messages.send_as_member(
            principal, session, self._file_draft(record, caption, client_msg_id)
        )
        return result.message

    async def download(self, principal: Principal, file_id: str, *, thumbnail: bool) -> Download:
        """What to stream for `/files/{id}[/thumb]`; participants of its session only."""
        record = await self.store.get(file_id)
        if record is None or record.deleted:
            raise NotFound("file not found", code="FILE_NOT_FOUND")
        await self.sessions.require_member(principal, record.session_id)
        if record.message_id is None and record.uploaded_by != principal.user_id:
            # Not on any message yet: nobody but its uploader knows of it.
            raise NotFound("file not found", code="FILE_NOT_FOUND")
        if thumbnail:
            if record.thumbnail_key is None:
                raise NotFound("this file has no thumbnail", code="NO_THUMBNAIL")
            key, content_type = record.thumbnail_key, _thumbnail_type(record)
        else:
            key, content_type = record.storage_key, record.file_type
        size = await self.blobs.size(key)
        if size is None:
            log.error("file %s has a row but no blob at %s", file_id, key)
            raise NotFound("file not found", code="FILE_NOT_FOUND")
        name = record.file_name if not thumbnail else f"thumb-{record.file_name}"
        etag = f'"{file_id}{"-t" if thumbnail else ""}-{size}"'
        return Download(key, size, content_type, name, etag)

    def stream(self, found: Download, start: int, end: int) -> AsyncIterator[bytes]:
        """The bytes of a download, `start`..`end` inclusive, in chunks."""
        return self.blobs.read(found.key, start, end)

    async def on_message_deleted(self, message: Message) -> None:
        if message.message_type != MessageType.FILE:
            return
        for record in await self.store.mark_deleted_for_message(message.message_id, utcnow()):
            await self._remove_deleted_blobs(record)

    async def retry_blob_removal(self, batch: int = 200) -> int:
        """Remove the blobs of deleted files that a blob store outage left behind."""
        removed = 0
        for record in await self.store.blobs_to_remove(batch):
            if await self._remove_deleted_blobs(record):
                removed += 1
        return removed

    async def _remove_deleted_blobs(self, record: FileRecord) -> bool:
        """The row is already marked deleted, so nobody can download the file; its blobs go
        now, or at the housekeeping job's next run if the blob store is unavailable."""
        try:
            for key in (record.storage_key, record.thumbnail_key):
                if key:
                    await self.blobs.delete(key)
        except Exception as exc:
            log.warning(
                "blobs of deleted file %s stay until the next retry: %s", record.file_id, exc
            )
            return False
        await self.store.mark_blobs_removed(record.file_id, utcnow())
        return True

    async def purge_unattached(self, older_than: datetime, batch: int = 200) -> int:
        """Remove uploads no message took up (`attach=false` and never attached)."""
        removed = 0
        for record in await self.store.unattached_before(older_than, batch):
            if await self._discard(record, in_store=True):
                removed += 1
        return removed

    @staticmethod
    def _file_draft(
        record: FileRecord, caption: str, client_msg_id: str | None, *, rate_limited: bool = True
    ) -> Draft:
        return Draft(
            content=caption,
            message_type=MessageType.FILE.value,
            metadata={"file_info": record.info()},
            client_msg_id=client_msg_id,
            file_id=record.file_id,
            rate_limited=rate_limited,
        )

    async def _file_of(self, message: Message) -> FileRecord | None:
        info = (message.metadata or {}).get("file_info") or {}
        file_id = info.get("file_id") if isinstance(info, dict) else None
        return await self.store.get(file_id) if isinstance(file_id, str) else None

    async def _discard(self, record: FileRecord, *, in_store: bool = False) -> bool:
        """Undo a stored, unattached upload; shielded so a cancelled request still cleans
        up. False when a message took the file meanwhile (then it stays)."""

        async def undo() -> bool:
            if in_store and not await self.store.remove_unattached(record.file_id):
                return False
            await self._delete_blobs(record)
            return True

        try:
            return await asyncio.shield(undo())
        except Exception:
            log.exception("could not remove the upload %s", record.file_id)
            return False

    async def _delete_blobs(self, record: FileRecord) -> None:
        for key in (record.storage_key, record.thumbnail_key):
            if key:
                try:
                    await self.blobs.delete(key)
                except Exception:  # the row is gone or marked: an orphan blob is harmless
                    log.exception("could not delete blob %s", key)


_THUMBNAIL_SUFFIXES = {"image/jpeg": ".jpg", "image/png": ".png", "image/webp": ".webp"}


def _thumbnail_key(base: str, thumbnail: Thumbnail) -> str:
    # The key's suffix records the thumbnail's format, so serving it needs no extra column.
    return f"{base}.thumb{_THUMBNAIL_SUFFIXES.get(thumbnail.content_type, '.jpg')}"


def _thumbnail_type(record: FileRecord) -> str:
    key = record.thumbnail_key or ""
    for content_type, suffix in _THUMBNAIL_SUFFIXES.items():
        if key.endswith(suffix):
            return content_type
    return "image/jpeg"


def _check_caption(caption: str | None) -> str:
    text = caption or ""
    if len(text) > MAX_CAPTION_CHARS:
        raise TooLarge(f"message is longer than {MAX_CAPTION_CHARS} characters")
    return text
