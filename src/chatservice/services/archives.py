"""Archives: transcripts on demand, the final archive when a session ends, periodic
snapshots of live sessions, and ending sessions left idle (the consultation chat's
schedulers).

Blob layout (the consultation chat's bucket layout): `archive/chat_{session}_final.txt`
(+ `.json`) and `temp/chat_{session}_snapshot_{yyyyMMddHHmmss}.txt`. Ending marks the
session's archive `pending` in the same UPDATE that ends it; writing the archive settles it
to `done` (or `empty`), so a blob store outage only delays the archive: the retry job
finishes it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import BinaryIO
from zoneinfo import ZoneInfo

from chatservice.blobs.base import READ_CHUNK, BlobStore
from chatservice.domain import ArchiveState, Message, Principal, Session, utcnow
from chatservice.services.errors import InvalidInput, NotFound
from chatservice.services.sessions import SessionService
from chatservice.services.transcripts import TranscriptContext, TranscriptWriter
from chatservice.store.archives import ArchiveStore
from chatservice.store.files import FileStore
from chatservice.store.messages import MessageStore

log = logging.getLogger(__name__)

TEXT_TYPE = "text/plain; charset=utf-8"
JSON_TYPE = "application/json"
FORMATS = ("text", "json")
JOB_BATCH = 200
# An end request writes its own archive; the retry job leaves it this long to do so.
PENDING_GRACE = timedelta(seconds=30)


@dataclass(frozen=True, slots=True)
class ArchiveSettings:
    language: str = "en"
    zone: ZoneInfo = field(default_factory=lambda: ZoneInfo("UTC"))
    snapshot_keep: int = 3
    idle_timeout: timedelta = timedelta(hours=60)


@dataclass(frozen=True, slots=True)
class Document:
    chunks: AsyncIterator[bytes]  # the body, read as it is sent
    content_type: str
    file_name: str


def final_key(session_id: str, fmt: str) -> str:
    return f"archive/chat_{session_id}_final.{'txt' if fmt == 'text' else 'json'}"


def snapshot_prefix(session_id: str) -> str:
    return f"temp/chat_{session_id}_snapshot_"


class ArchiveService:
    def __init__(
        self,
        sessions: SessionService,
        messages: MessageStore,
        files: FileStore,
        store: ArchiveStore,
        blobs: BlobStore,
        settings: ArchiveSettings,
    ) -> None:
        self.sessions = sessions
        self.messages = messages
        self.files = files
        self.store = store
        self.blobs = blobs
        self.settings = settings

    async def on_deleted(self, session: Session) -> None:
        """A deleted session is never archived; its snapshots must not outlive it."""
        await self.blobs.delete_prefix(snapshot_prefix(session.session_id))

    async def on_message_deleted(self, message: Message) -> None:
        """A deleted message must not live on in snapshots: drop them, snapshot afresh.

        The reset comes first: if the blob store is down now, the snapshot job's next run
        for this session replaces every snapshot it has (see `_snapshot`)."""
        await self.store.reset_snapshot(message.session_id)
        await self.blobs.delete_prefix(snapshot_prefix(message.session_id))

    # -- for participants ------------------------------------------------------------------

    async def transcript(self, principal: Principal, session_id: str, fmt: str) -> Document:
        """The session's history as it stands now."""
        _check_format(fmt)
        session, _ = await self.sessions.require_member(principal, session_id)
        _, (body,) = await self._render(session, utcnow(), fmt)
        if fmt == "json":
            return Document(_chunks_of(body), JSON_TYPE, f"chat-{session_id}.json")
        return Document(_chunks_of(body), TEXT_TYPE, f"chat-{session_id}.txt")

    async def archived(self, principal: Principal, session_id: str, fmt: str) -> Document:
        """The transcript archived when the session ended; NotFound when there is none."""
        _check_format(fmt)
        session, _ = await self.sessions.require_member(principal, session_id)
        key = session.archive_key if fmt == "text" else session.archive_json_key
        if session.archive_state != ArchiveState.DONE or key is None:
            raise NotFound(_no_archive_reason(session), code="ARCHIVE_NOT_FOUND")
        if await self.blobs.size(key) is None:
            log.error("session %s records archive %s but the blob is missing", session_id, key)
            raise NotFound("the archive is missing from storage", code="ARCHIVE_NOT_FOUND")
        extension = "txt" if fmt == "text" else "json"
        content_type = TEXT_TYPE if fmt == "text" else JSON_TYPE
        return Document(
            self.blobs.read(key), content_type, f"archived-chat-log-{session_id}.{extension}"
        )

    # -- on end ----------------------------------------------------------------------------

    async def on_ended(self, session: Session) -> None:
        """Archive right away; if storage fails the session stays `pending` for the retry."""
        try:
            await self.archive(session.session_id)
        except Exception:
            log.exception(
                "archiving session %s failed; the retry job will try again", session.session_id
            )

    async def archive(self, session_id: str) -> ArchiveState | None:
        """Write the final transcripts of an ended session, once; returns its archive state."""
        session = await self.sessions.store.get(session_id)
        if session is None or session.archive_state is None:
            return None
        if session.archive_state != ArchiveState.PENDING:
            return ArchiveState(session.archive_state)
        now = utcnow()
        count, (text, json) = await self._render(session, now, "text", "json")
        with text, json:
            if count == 0:
                # As in the consultation chat, a session without messages is not archived.
                await self.store.record_archive(
                    session_id, ArchiveState.EMPTY, text_key=None, json_key=None, now=now
                )
                await self.blobs.delete_prefix(snapshot_prefix(session_id))
                return ArchiveState.EMPTY
            text_key, json_key = final_key(session_id, "text"), final_key(session_id, "json")
            await self.blobs.put_stream(text_key, text, TEXT_TYPE)
            await self.blobs.put_stream(json_key, json, JSON_TYPE)
        await self.store.record_archive(
            session_id, ArchiveState.DONE, text_key=text_key, json_key=json_key, now=now
        )
        # The final archive supersedes the snapshots (as the consultation chat's
        # clearTempSnapshots does).
        await self.blobs.delete_prefix(snapshot_prefix(session_id))
        return ArchiveState.DONE

    # -- jobs ------------------------------------------------------------------------------

    async def snapshot_changed(self) -> int:
        """Snapshot every live session with messages since its last snapshot."""
        written = 0
        for session in await self.store.changed_since_snapshot(JOB_BATCH):
            try:
                await self._snapshot(session)
                written += 1
            except Exception:
                log.exception("snapshot of session %s failed", session.session_id)
        return written

    async def end_idle(self) -> int:
        """End (and so archive) sessions with no activity for SESSION_IDLE_TIMEOUT."""
        quiet_since = utcnow() - self.settings.idle_timeout
        ended = 0
        for session_id in await self.store.idle(quiet_since, JOB_BATCH):
            try:
                if await self.sessions.expire(session_id, quiet_since) is not None:
                    ended += 1
            except Exception:
                log.exception("ending idle session %s failed", session_id)
        return ended

    async def retry_pending(self) -> int:
        """Finish archives that a blob store outage left pending."""
        done = 0
        for session_id in await self.store.pending(utcnow() - PENDING_GRACE, JOB_BATCH):
            try:
                await self.archive(session_id)
                done += 1
            except Exception:
                log.exception("archiving session %s failed again", session_id)
        return done

    async def _snapshot(self, session: Session) -> None:
        now = utcnow()
        _, (text,) = await self._render(session, now, "text")
        # UTC, not TRANSCRIPT_TIMEZONE: names must sort by time even across DST changes.
        stamp = now.strftime("%Y%m%d%H%M%S")
        prefix = snapshot_prefix(session.session_id)
        if session.snapshot_seq == 0:
            # The first snapshot, or the first since a message was deleted: none of the
            # older ones may survive it (their removal may have failed at delete time).
            await self.blobs.delete_prefix(prefix)
        with text:
            await self.blobs.put_stream(f"{prefix}{stamp}.txt", text, TEXT_TYPE)
        await self.store.record_snapshot(session.session_id, session.last_seq)
        current = await self.sessions.store.get(session.session_id)
        if current is None or current.archive_state is not None:
            # It ended while this snapshot was written, after its archive cleared temp/.
            await self.blobs.delete_prefix(prefix)
            return
        # The stamp sorts by time: keep the newest few, which is what a restore needs.
        older = (await self.blobs.list(prefix))[: -self.settings.snapshot_keep]
        for key in older:
            await self.blobs.delete(key)

    async def _render(
        self, session: Session, now: datetime, *formats: str
    ) -> tuple[int, list[BinaryIO]]:
        """The session's transcript in each format, as files rewound for reading (the
        caller closes them), and how many messages they hold."""
        detail = await self.sessions.store.detail(session)
        files = {
            record.message_id: record
            for record in await self.files.for_session(session.session_id)
            if record.message_id is not None
        }
        context = TranscriptContext(detail, self.settings.zone, now, files)
        writers = [TranscriptWriter(context, fmt, self.settings.language) for fmt in formats]
        done: list[BinaryIO] = []
        try:
            async for page in self.messages.pages(session.session_id):
                for writer in writers:
                    # Formatting a page takes milliseconds: not on the event loop.
                    await asyncio.to_thread(writer.add, page)
            for writer in writers:
                done.append(await asyncio.to_thread(writer.finish))
        except BaseException:
            for writer in writers:
                writer.close()
            for body in done:
                body.close()
            raise
        return writers[0].count, done


async def _chunks_of(body: BinaryIO) -> AsyncIterator[bytes]:
    """A rendered transcript, read a piece at a time, then closed."""
    try:
        while chunk := await asyncio.to_thread(body.read, READ_CHUNK):
            yield chunk
    finally:
        body.close()


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise InvalidInput("format must be text or json")


def _no_archive_reason(session: Session) -> str:
    if session.archive_state is None:
        return "the session has not ended, so it has no archive yet"
    if session.archive_state == ArchiveState.EMPTY:
        return "the session ended without messages, so nothing was archived"
    return "the archive is still being written; try again shortly"
