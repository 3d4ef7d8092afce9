"""Archives: transcripts (the consultation transcript layout, en/ko, JSON), the final archive
written when a session ends, snapshots, idle sessions and pending archives, on the real
services and stores of each database; once more end to end against an S3 server (moto)."""

from __future__ import annotations

import functools
import io
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, cast
from zoneinfo import ZoneInfo

import orjson
import pytest
from PIL import Image
from sqlalchemy import update

from chatservice import events
from chatservice.app import build_components
from chatservice.blobs.base import BlobNotFound, BlobStore
from chatservice.components import Components
from chatservice.config import Settings
from chatservice.domain import Message, Principal, Session, utcnow
from chatservice.services import archives as archives_module
from chatservice.services.archives import ArchiveService, ArchiveSettings, Document
from chatservice.services.errors import Forbidden, InvalidInput, NotFound
from chatservice.services.files import Upload
from chatservice.store.tables import chat_sessions
from tests.conftest import TEST_SECRET, new_user
from tests.integration.helpers import BusTap, group, send, users
from tests.s3_server import (
    S3_ACCESS_KEY_ID,
    S3_REGION,
    S3_SECRET_ACCESS_KEY,
    new_bucket_name,
    s3_client,
    s3_endpoint,  # noqa: F401
)

RULE = "=" * 50
SEPARATOR = "-" * 50
NOTES = "회의 메모\nline two\n".encode()
GENERATED = re.compile(r"^(Generated at|생성 일시): (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)$", re.M)
SNAPSHOT = re.compile(r"^temp/chat_(sess_[0-9a-z]+)_snapshot_(\d{14})\.txt$")


async def body_of(document: Document) -> bytes:
    return b"".join([chunk async for chunk in document.chunks])


# -- helpers -------------------------------------------------------------------------------


def second_service(
    parts: Components, blobs: BlobStore | None = None, **settings: Any
) -> ArchiveService:
    """Another ArchiveService over the same stores, which does NOT listen to session ends
    (only the composition root wires listeners; the test's own `parts.archives` keeps that
    job)."""
    base = parts.archives.settings
    service = ArchiveService(
        parts.sessions,
        parts.messages.store,
        parts.files.store,
        parts.archives.store,
        blobs or parts.blobs,
        ArchiveSettings(
            language=settings.get("language", base.language),
            zone=settings.get("zone", base.zone),
            snapshot_keep=settings.get("snapshot_keep", base.snapshot_keep),
            idle_timeout=settings.get("idle_timeout", base.idle_timeout),
        ),
    )
    return service


async def history(parts: Components, who: Principal, session_id: str) -> list[Message]:
    return (await parts.messages.page(who, session_id, before=None, after=None, limit=50)).messages


def at(moment: datetime, zone: str = "UTC") -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(ZoneInfo(zone)).strftime("%Y-%m-%d %H:%M:%S")


def generated_at(text: str) -> datetime:
    match = GENERATED.search(text)
    assert match, text
    return datetime.strptime(match.group(2), "%Y-%m-%d %H:%M:%S")


def without_generated(text: str) -> str:
    return GENERATED.sub(r"\1: <generated>", text)


async def upload_text(
    parts: Components, who: Principal, session_id: str, caption: str
) -> tuple[Any, Message]:
    session = await parts.files.check_can_upload(who, session_id)
    record, message = await parts.files.upload(
        who,
        session,
        Upload("notes.txt", "text/plain", io.BytesIO(NOTES), len(NOTES)),
        caption=caption,
        attach=True,
    )
    assert message is not None
    return record, message


class Conversation:
    """A titled group: 앨리스 (owner) and 밥 (a member; his name comes from his own token)
    have display names, carol has none; four messages, the last a file with a caption."""

    def __init__(self) -> None:
        self.alice = Principal(new_user("alice"), name="앨리스 Kim")
        self.bob = Principal(new_user("bob"), name="밥 Lee")
        self.carol = Principal(new_user("carol"))
        self.session_id = ""
        self.messages: list[Message] = []
        self.record: Any = None

    async def build(self, parts: Components) -> Conversation:
        sid = await group(parts, self.alice, self.bob, self.carol, title="Consult #7")
        self.session_id = sid
        await send(parts, self.alice, sid, "Hello, 안녕하세요")
        await send(parts, self.bob, sid, "네, 무엇이 궁금하신가요?\n두 줄")
        await send(parts, self.carol, sid, "carol here")
        self.record, _ = await upload_text(parts, self.alice, sid, "자료 첨부")
        self.messages = await history(parts, self.alice, sid)
        assert [m.seq for m in self.messages] == [1, 2, 3, 4]
        return self

    def expected_text(self, zone: str = "UTC") -> str:
        """The English transcript, with `<generated>` for the generation time."""
        one, two, three, four = self.messages
        a, b, c, r = self.alice.user_id, self.bob.user_id, self.carol.user_id, self.record
        return (
            f"{RULE}\n       Chat transcript\n{RULE}\n\n"
            f"Session: {self.session_id} (Consult #7)\n"
            "Generated at: <generated>\n"
            "Total messages: 4\n"
            f"\n{RULE}\n\n"
            f"[{at(one.created_at, zone)}]\n"
            f"From: 앨리스 Kim ({a})\n"
            "Content: Hello, 안녕하세요\n"
            f"{SEPARATOR}\n"
            f"[{at(two.created_at, zone)}]\n"
            f"From: 밥 Lee ({b})\n"
            "Content: 네, 무엇이 궁금하신가요?\n두 줄\n"
            f"{SEPARATOR}\n"
            f"[{at(three.created_at, zone)}]\n"
            f"From: {c} ({c})\n"
            "Content: carol here\n"
            f"{SEPARATOR}\n"
            f"[{at(four.created_at, zone)}]\n"
            f"From: 앨리스 Kim ({a})\n"
            "Content: 자료 첨부\n"
            f"File: notes.txt (text/plain, {len(NOTES)} bytes) /files/{r.file_id}\n"
            f"{SEPARATOR}\n"
            f"\n{RULE}\nEnd of transcript\n{RULE}\n"
        )


async def set_times(parts: Components, session_id: str, **values: datetime) -> None:
    async with parts.database.write() as conn:
        await conn.execute(
            update(chat_sessions).where(chat_sessions.c.session_id == session_id).values(**values)
        )


async def session_row(parts: Components, session_id: str) -> Session:
    session = await parts.sessions.store.get(session_id)
    assert session is not None
    return session


def snapshots_of(keys: list[str], session_id: str) -> list[str]:
    stamps = []
    for key in keys:
        match = SNAPSHOT.match(key)
        assert match, key
        assert match.group(1) == session_id
        stamps.append(match.group(2))
    return stamps


class Clock:
    """Moves the archive service's clock (only the stamp of snapshot names depends on it)
    forward, so successive snapshots fall into different seconds without sleeping."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.offset = timedelta(0)
        monkeypatch.setattr(archives_module, "utcnow", lambda: utcnow() + self.offset)

    def advance(self, seconds: float = 1.0) -> None:
        self.offset += timedelta(seconds=seconds)


async def drain_snapshots(service: ArchiveService) -> int:
    """Run the snapshot job until it finds nothing: the database is shared with other
    tests, whose sessions with messages are snapshotted (200 a run) along with ours."""
    total = 0
    while written := await service.snapshot_changed():
        total += written
    return total


class ArchiveWatch(BusTap):
    """A BusTap that also notes, as each session_ended event arrives, whether the session's
    archive is already in the (local) blob store."""

    def __init__(self, parts: Components, session_id: str) -> None:
        super().__init__()
        root = parts.settings.effective_file_storage_path
        self.archive_file = root / f"archive/chat_{session_id}_final.txt"
        self.archived_when_ended: list[bool] = []

    def __call__(self, channel: str, data: bytes) -> None:
        super().__call__(channel, data)
        if self.events[-1].get("event") == "session_ended":
            self.archived_when_ended.append(self.archive_file.is_file())


class FailingPuts:
    """Fault injection: a blob store whose writes fail (reads and deletes still work)."""

    def __init__(self, inner: BlobStore) -> None:
        self.inner = inner
        self.attempts = 0

    async def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        self.attempts += 1
        raise OSError("blob store unavailable")

    async def put_stream(self, key: str, source: BinaryIO, content_type: str) -> int:
        self.attempts += 1
        raise OSError("blob store unavailable")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


# -- transcripts ---------------------------------------------------------------------------


async def test_text_transcript_layout(parts: Components) -> None:
    chat = await Conversation().build(parts)
    before = utcnow().replace(microsecond=0, tzinfo=None)
    document = await parts.archives.transcript(chat.bob, chat.session_id, "text")
    after = utcnow().replace(tzinfo=None)
    assert document.content_type == "text/plain; charset=utf-8"
    assert document.file_name == f"chat-{chat.session_id}.txt"
    text = (await body_of(document)).decode()
    assert before <= generated_at(text) <= after
    assert without_generated(text) == chat.expected_text()


async def test_transcript_leaves_out_deleted_messages(parts: Components) -> None:
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    await send(parts, alice, sid, "keep me")
    await send(parts, alice, sid, "delete me")
    (_, doomed) = await history(parts, alice, sid)
    await parts.messages.delete(alice, doomed.message_id)
    text = (await body_of(await parts.archives.transcript(bob, sid, "text"))).decode()
    assert "Total messages: 1\n" in text
    assert "Content: keep me\n" in text
    assert "delete me" not in text


async def test_empty_session_transcript(parts: Components) -> None:
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    document = await parts.archives.transcript(bob, sid, "text")
    assert (await body_of(document)).decode() == "There are no messages in this chat."
    korean = second_service(parts, language="ko")
    assert (
        await body_of(await korean.transcript(bob, sid, "text"))
    ).decode() == "채팅 내역이 없습니다."
    body = orjson.loads(await body_of(await parts.archives.transcript(alice, sid, "json")))
    assert (body["message_count"], body["messages"], body["files"]) == (0, [], [])


async def test_korean_labels_are_the_consultation_chats(parts: Components) -> None:
    chat = await Conversation().build(parts)
    korean = second_service(parts, language="ko")
    text = (await body_of(await korean.transcript(chat.alice, chat.session_id, "text"))).decode()
    english = chat.expected_text()
    for en, ko in (
        ("       Chat transcript\n", "       상담 채팅 기록\n"),
        ("Session: ", "상담 요청 번호: "),
        ("Generated at: ", "생성 일시: "),
        ("Total messages: ", "총 메시지 수: "),
        ("From: ", "발신: "),
        ("Content: ", "내용: "),
        ("File: ", "첨부 파일: "),
        ("End of transcript\n", "채팅 기록 끝\n"),
    ):
        english = english.replace(en, ko)
    assert without_generated(text) == english
    assert text.startswith(f"{RULE}\n       상담 채팅 기록\n{RULE}\n\n상담 요청 번호: ")
    assert text.endswith(f"\n{RULE}\n채팅 기록 끝\n{RULE}\n")


async def test_timezone_shifts_the_printed_times(parts: Components) -> None:
    chat = await Conversation().build(parts)
    seoul = second_service(parts, zone=ZoneInfo("Asia/Seoul"))
    utc_text = await body_of(await parts.archives.transcript(chat.alice, chat.session_id, "text"))
    seoul_text = (
        await body_of(await seoul.transcript(chat.alice, chat.session_id, "text"))
    ).decode()
    assert without_generated(seoul_text) == chat.expected_text("Asia/Seoul")

    def stamps(text: str) -> list[datetime]:
        found = re.findall(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\]$", text, re.M)
        return [datetime.strptime(s, "%Y-%m-%d %H:%M:%S") for s in found]

    utc_stamps, seoul_stamps = stamps(utc_text.decode()), stamps(seoul_text)
    assert len(utc_stamps) == len(seoul_stamps) == 4
    assert [s - u for u, s in zip(utc_stamps, seoul_stamps, strict=True)] == [
        timedelta(hours=9)
    ] * 4
    shift = generated_at(seoul_text) - generated_at(utc_text.decode())
    assert timedelta(hours=9) <= shift <= timedelta(hours=9, seconds=2)


async def test_json_transcript(parts: Components) -> None:
    chat = await Conversation().build(parts)
    document = await parts.archives.transcript(chat.bob, chat.session_id, "json")
    assert (document.content_type, document.file_name) == (
        "application/json",
        f"chat-{chat.session_id}.json",
    )
    body = orjson.loads(await body_of(document))
    a, b, c = chat.alice.user_id, chat.bob.user_id, chat.carol.user_id
    assert body["session"]["session_id"] == chat.session_id
    assert body["session"]["title"] == "Consult #7"
    assert (body["session"]["kind"], body["session"]["status"]) == ("group", "active")
    assert sorted(
        (p["user_id"], p["display_name"], p["role"]) for p in body["session"]["participants"]
    ) == sorted([(a, "앨리스 Kim", "owner"), (b, "밥 Lee", "member"), (c, None, "member")])
    assert body["message_count"] == 4
    rendered = body["messages"]
    assert [
        (m["seq"], m["sender_id"], m["sender_name"], m["message_type"], m["content"])
        for m in rendered
    ] == [
        (1, a, "앨리스 Kim", "text", "Hello, 안녕하세요"),
        (2, b, "밥 Lee", "text", "네, 무엇이 궁금하신가요?\n두 줄"),
        (3, c, c, "text", "carol here"),
        (4, a, "앨리스 Kim", "file", "자료 첨부"),
    ]
    assert [m["message_id"] for m in rendered] == [m.message_id for m in chat.messages]
    assert [m["file"] for m in rendered] == [None, None, None, chat.record.info()]
    assert rendered[3]["metadata"] == {"file_info": chat.record.info()}
    assert body["files"] == [chat.record.info()]
    assert all(m["created_at"].endswith("Z") for m in rendered)
    assert body["generated_at"].endswith("Z")


async def test_a_transcript_written_a_page_at_a_time_is_the_same_transcript(
    parts: Components, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Transcripts are written page by page (their memory must not grow with the
    session): pages of one and of three messages give what one page gives."""
    chat = await Conversation().build(parts)
    whole = {
        fmt: await body_of(await parts.archives.transcript(chat.bob, chat.session_id, fmt))
        for fmt in ("text", "json")
    }
    paged = parts.archives.messages.pages
    for size in (1, 3):
        monkeypatch.setattr(
            parts.archives.messages, "pages", functools.partial(paged, page_size=size)
        )
        text = await body_of(await parts.archives.transcript(chat.bob, chat.session_id, "text"))
        assert GENERATED.sub("", text.decode()) == GENERATED.sub("", whole["text"].decode())
        body = orjson.loads(
            await body_of(await parts.archives.transcript(chat.bob, chat.session_id, "json"))
        )
        expected = orjson.loads(whole["json"])
        assert body.pop("generated_at") and expected.pop("generated_at")
        assert body == expected


async def test_transcript_rejects_unknown_formats(parts: Components) -> None:
    (alice,) = users(1)
    sid = await group(parts, alice)
    for call in (
        parts.archives.transcript(alice, sid, "pdf"),
        parts.archives.archived(alice, sid, "xml"),
    ):
        with pytest.raises(InvalidInput):
            await call


async def test_who_may_read_transcripts_and_archives(parts: Components) -> None:
    alice, bob, mallory = users(3)
    sid = await group(parts, alice, bob)
    await send(parts, alice, sid, "secret")
    for fmt in ("text", "json"):
        with pytest.raises(Forbidden):
            await parts.archives.transcript(mallory, sid, fmt)
        with pytest.raises(NotFound) as early:
            await parts.archives.archived(bob, sid, fmt)
        assert early.value.code == "ARCHIVE_NOT_FOUND"
    await parts.sessions.end(alice, sid)
    for fmt in ("text", "json"):
        assert await body_of(await parts.archives.archived(bob, sid, fmt))
        with pytest.raises(Forbidden):
            await parts.archives.archived(mallory, sid, fmt)
        with pytest.raises(Forbidden):
            await parts.archives.transcript(mallory, sid, fmt)
    await parts.sessions.delete(alice, sid)
    for fmt in ("text", "json"):
        for call in (
            parts.archives.transcript(alice, sid, fmt),
            parts.archives.archived(alice, sid, fmt),
        ):
            with pytest.raises(NotFound) as gone:
                await call
            assert gone.value.code == "SESSION_NOT_FOUND"
    with pytest.raises(NotFound):
        await parts.archives.transcript(alice, "sess_doesnotexist", "text")


# -- the final archive -----------------------------------------------------------------------


async def test_end_writes_the_archive_once(parts: Components) -> None:
    chat = await Conversation().build(parts)
    sid = chat.session_id
    text_key = f"archive/chat_{sid}_final.txt"
    json_key = f"archive/chat_{sid}_final.json"
    ended = await parts.sessions.end(chat.alice, sid)
    assert (ended.status, ended.archive_state) == ("archived", "done")
    assert (ended.archive_key, ended.archive_json_key) == (text_key, json_key)
    assert ended.archived_at is not None
    assert await parts.blobs.list("archive/") == [json_key, text_key]

    stored_text = await parts.blobs.get_bytes(text_key)
    assert without_generated(stored_text.decode()) == chat.expected_text()
    body = orjson.loads(await parts.blobs.get_bytes(json_key))
    assert body["session"]["status"] == "archived"
    assert body["session"]["ended_at"] is not None
    assert [m["seq"] for m in body["messages"]] == [1, 2, 3, 4]

    for who in (chat.alice, chat.bob):
        document = await parts.archives.archived(who, sid, "text")
        assert (await body_of(document)) == stored_text
        assert document.content_type == "text/plain; charset=utf-8"
        assert document.file_name == f"archived-chat-log-{sid}.txt"
        as_json = await parts.archives.archived(who, sid, "json")
        assert (await body_of(as_json)) == await parts.blobs.get_bytes(json_key)
        assert as_json.file_name == f"archived-chat-log-{sid}.json"

    # Ending again answers the ended session and writes nothing.
    again = await parts.sessions.end(chat.alice, sid)
    assert (again.status, again.archive_state) == ("archived", "done")
    assert await parts.blobs.get_bytes(text_key) == stored_text
    await parts.blobs.delete(text_key)
    await parts.sessions.end(chat.alice, sid)
    assert await parts.archives.archive(sid) == "done"
    with pytest.raises(BlobNotFound):
        await parts.blobs.get_bytes(text_key)
    with pytest.raises(NotFound) as missing:
        await parts.archives.archived(chat.bob, sid, "text")
    assert missing.value.code == "ARCHIVE_NOT_FOUND"


async def test_end_announces_the_session_ended(parts: Components) -> None:
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    await send(parts, bob, sid, "bye")
    tap = ArchiveWatch(parts, sid)
    await parts.bus.subscribe([events.session_channel(sid)], tap)
    try:
        await parts.sessions.end(alice, sid)
        await parts.sessions.end(alice, sid)
    finally:
        await parts.bus.unsubscribe([events.session_channel(sid)], tap)
    (event,) = tap.of_type("system")
    assert (event["event"], event["user_id"]) == ("session_ended", alice.user_id)
    assert "reason" not in event
    # The archive is written before the event goes out: a client may fetch it at once.
    assert tap.archived_when_ended == [True]


async def test_empty_session_is_not_archived(parts: Components) -> None:
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    await send(parts, alice, sid, "soon deleted")
    (message,) = await history(parts, alice, sid)
    await parts.messages.delete(alice, message.message_id)
    ended = await parts.sessions.end(alice, sid)
    assert (ended.status, ended.archive_state) == ("archived", "empty")
    assert (ended.archive_key, ended.archive_json_key) == (None, None)
    for fmt in ("text", "json"):
        with pytest.raises(NotFound) as none:
            await parts.archives.archived(bob, sid, fmt)
        assert none.value.code == "ARCHIVE_NOT_FOUND"
    assert await parts.blobs.list("archive/") == []
    assert await parts.blobs.list("temp/") == []


# -- snapshots -------------------------------------------------------------------------------


async def test_snapshots_follow_new_messages_and_end_removes_them(
    parts: Components, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock(monkeypatch)
    chat = await Conversation().build(parts)
    sid = chat.session_id
    quiet_sid = await group(parts, chat.alice)  # no messages: never snapshotted
    prefix = f"temp/chat_{sid}_snapshot_"
    keep = parts.archives.settings.snapshot_keep
    assert keep == parts.settings.archive_snapshot_keep == 3

    before = utcnow()
    assert await drain_snapshots(parts.archives) >= 1
    (first,) = await parts.blobs.list(prefix)
    (stamp,) = snapshots_of([first], sid)
    taken = datetime.strptime(stamp, "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    assert before.replace(microsecond=0) <= taken <= utcnow()
    snapshot = (await parts.blobs.get_bytes(first)).decode()
    assert without_generated(snapshot) == chat.expected_text()
    assert await parts.blobs.list(f"temp/chat_{quiet_sid}_") == []
    assert (await session_row(parts, sid)).snapshot_seq == 4

    # Nothing new: the next runs write nothing.
    clock.advance()
    assert await parts.archives.snapshot_changed() == 0
    assert await parts.archives.snapshot_changed() == 0
    assert await parts.blobs.list(prefix) == [first]

    # Each new message: one more snapshot; only the newest `keep` stay.
    stamps = [stamp]
    for n in range(4):
        await send(parts, chat.bob, sid, f"more {n}")
        clock.advance()
        assert await parts.archives.snapshot_changed() == 1
        keys = await parts.blobs.list(prefix)
        stamps = snapshots_of(keys, sid)
        assert len(keys) == min(n + 2, keep)
        assert stamps == sorted(stamps)
        assert (await session_row(parts, sid)).snapshot_seq == 5 + n
    newest = (await parts.blobs.get_bytes(f"{prefix}{stamps[-1]}.txt")).decode()
    assert "Total messages: 8\n" in newest
    assert "Content: more 3\n" in newest
    oldest_kept = (await parts.blobs.get_bytes(f"{prefix}{stamps[0]}.txt")).decode()
    assert "Total messages: 6\n" in oldest_kept

    ended = await parts.sessions.end(chat.alice, sid)
    assert ended.archive_state == "done"
    assert await parts.blobs.list(prefix) == []
    assert [key for key in await parts.blobs.list("temp/") if sid in key] == []
    assert await parts.archives.snapshot_changed() == 0


async def test_snapshot_names_are_utc_whatever_the_transcript_zone(
    parts: Components, monkeypatch: pytest.MonkeyPatch
) -> None:
    # UTC names sort by time even across DST changes; the text inside uses the zone.
    Clock(monkeypatch)
    (alice,) = users(1)
    sid = await group(parts, alice)
    await send(parts, alice, sid, "hi")
    (message,) = await history(parts, alice, sid)
    seoul = second_service(parts, zone=ZoneInfo("Asia/Seoul"))
    before = utcnow()
    await drain_snapshots(seoul)
    (key,) = await parts.blobs.list(f"temp/chat_{sid}_snapshot_")
    (stamp,) = snapshots_of([key], sid)
    taken = datetime.strptime(stamp, "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    assert before.replace(microsecond=0) <= taken <= utcnow()
    text = (await parts.blobs.get_bytes(key)).decode()
    assert f"[{at(message.created_at, 'Asia/Seoul')}]\n" in text


async def test_deleting_a_message_replaces_the_snapshots(
    parts: Components, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock(monkeypatch)
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    await send(parts, alice, sid, "a public remark")
    await send(parts, alice, sid, "an indiscreet remark")
    prefix = f"temp/chat_{sid}_snapshot_"
    await drain_snapshots(parts.archives)
    (old,) = await parts.blobs.list(prefix)
    assert "an indiscreet remark" in (await parts.blobs.get_bytes(old)).decode()

    _, indiscreet = await history(parts, alice, sid)
    await parts.messages.delete(alice, indiscreet.message_id)
    assert await parts.blobs.list(prefix) == []
    assert (await session_row(parts, sid)).snapshot_seq == 0
    clock.advance()
    assert await parts.archives.snapshot_changed() == 1
    (fresh,) = await parts.blobs.list(prefix)
    text = (await parts.blobs.get_bytes(fresh)).decode()
    assert "Total messages: 1\n" in text
    assert "a public remark" in text
    assert "indiscreet" not in text


# -- idle sessions ---------------------------------------------------------------------------


async def test_end_idle_ends_and_archives_quiet_sessions(parts: Components) -> None:
    alice, bob = users(2)
    idle = await group(parts, alice, bob)
    busy = await group(parts, alice, bob)
    await send(parts, bob, idle, "anyone there?")
    await send(parts, bob, busy, "still here")
    timeout = parts.archives.settings.idle_timeout
    assert timeout == timedelta(seconds=parts.settings.session_idle_timeout)
    # Quiet for longer than SESSION_IDLE_TIMEOUT (the busy one just short of it).
    await set_times(parts, idle, updated_at=utcnow() - timeout - timedelta(minutes=1))
    await set_times(parts, busy, updated_at=utcnow() - timeout + timedelta(minutes=1))

    tap = ArchiveWatch(parts, idle)
    channels = [events.session_channel(idle), events.session_channel(busy)]
    await parts.bus.subscribe(channels, tap)
    try:
        assert await parts.archives.end_idle() >= 1
    finally:
        await parts.bus.unsubscribe(channels, tap)

    ended = await session_row(parts, idle)
    assert (ended.status, ended.archive_state) == ("archived", "done")
    assert ended.ended_at is not None
    assert (await session_row(parts, busy)).status == "active"
    (event,) = tap.events
    assert event["type"] == "system"
    assert (event["session_id"], event["event"]) == (idle, "session_ended")
    assert (event["user_id"], event["reason"]) == (None, "idle")
    assert tap.archived_when_ended == [True]
    text = (await body_of(await parts.archives.archived(alice, idle, "text"))).decode()
    assert "Content: anyone there?\n" in text
    assert await parts.blobs.list("archive/") == [
        f"archive/chat_{idle}_final.json",
        f"archive/chat_{idle}_final.txt",
    ]
    # Ended once: the next run finds nothing of ours.
    await parts.archives.end_idle()
    assert (await session_row(parts, busy)).status == "active"


# -- pending archives --------------------------------------------------------------------------


async def test_blob_outage_leaves_the_archive_pending_until_retried(parts: Components) -> None:
    chat = await Conversation().build(parts)
    sid = chat.session_id
    broken = FailingPuts(parts.blobs)
    failing = second_service(parts, blobs=cast(BlobStore, broken))
    # Only the failing service archives on end.
    parts.sessions.end_listeners.remove(parts.archives.on_ended)
    parts.sessions.end_listeners.append(failing.on_ended)

    ended = await parts.sessions.end(chat.alice, sid)
    assert broken.attempts == 1
    assert (ended.status, ended.archive_state) == ("archived", "pending")
    assert (ended.archive_key, ended.archive_json_key) == (None, None)
    assert await parts.blobs.list("archive/") == []
    with pytest.raises(NotFound) as pending:
        await parts.archives.archived(chat.bob, sid, "text")
    assert pending.value.code == "ARCHIVE_NOT_FOUND"

    # Within PENDING_GRACE the retry job leaves it to the end request.
    await parts.archives.retry_pending()
    assert (await session_row(parts, sid)).archive_state == "pending"

    # Still failing: stays pending.
    grace = archives_module.PENDING_GRACE
    await set_times(parts, sid, ended_at=utcnow() - grace - timedelta(seconds=5))
    await failing.retry_pending()
    assert broken.attempts >= 2
    assert (await session_row(parts, sid)).archive_state == "pending"

    # The store is back.
    assert await parts.archives.retry_pending() >= 1
    done = await session_row(parts, sid)
    assert done.archive_state == "done"
    assert done.archive_key == f"archive/chat_{sid}_final.txt"
    text = (await body_of(await parts.archives.archived(chat.bob, sid, "text"))).decode()
    assert without_generated(text) == chat.expected_text()
    assert await parts.archives.archive(sid) == "done"


# -- against an S3 server ----------------------------------------------------------------------


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET_ACCESS_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", S3_REGION)
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    yield


async def test_archive_flow_on_s3(
    database_url: str,
    tmp_path: Path,
    s3_endpoint: str,  # noqa: F811
    s3_env: None,
) -> None:
    bucket = new_bucket_name()
    settings = Settings(
        database_url=database_url,
        jwt_secret_key=TEST_SECRET,
        data_dir=tmp_path,
        database_pool_size=2,
        database_max_overflow=3,
        file_storage_type="s3",
        s3_bucket_name=bucket,
        s3_endpoint_url=s3_endpoint,
        s3_region=S3_REGION,
        _env_file=None,
    )
    s3parts = build_components(settings)
    await s3parts.blobs.start()  # creates the bucket
    await s3parts.bus.start()
    try:
        alice = Principal(new_user("alice"), name="Alice")
        bob = Principal(new_user("bob"))
        sid = await group(s3parts, alice, bob)
        await send(s3parts, alice, sid, "the picture")
        picture = io.BytesIO()
        Image.new("RGB", (400, 300), (10, 120, 200)).save(picture, "PNG")
        data = picture.getvalue()
        session = await s3parts.files.check_can_upload(alice, sid)
        record, message = await s3parts.files.upload(
            alice,
            session,
            Upload("pic.png", "image/png", io.BytesIO(data), len(data)),
            caption=None,
            attach=True,
        )
        assert message is not None
        found = await s3parts.files.download(bob, record.file_id, thumbnail=False)
        body = b"".join([c async for c in s3parts.files.stream(found, 0, found.size - 1)])
        assert body == data
        thumb = await s3parts.files.download(bob, record.file_id, thumbnail=True)
        thumb_bytes = b"".join([c async for c in s3parts.files.stream(thumb, 0, thumb.size - 1)])
        assert Image.open(io.BytesIO(thumb_bytes)).size == (320, 240)

        ended = await s3parts.sessions.end(alice, sid)
        assert ended.archive_state == "done"
        archived = await body_of(await s3parts.archives.archived(bob, sid, "text"))
        text = archived.decode()
        assert "From: Alice (" in text and "Content: the picture\n" in text
        assert f"File: pic.png (image/png, {len(data)} bytes) /files/{record.file_id}" in text

        async with s3_client(s3_endpoint) as s3:
            listing = await s3.list_objects_v2(Bucket=bucket)
            keys = sorted(item["Key"] for item in listing.get("Contents", []))
            assert keys == [
                f"archive/chat_{sid}_final.json",
                f"archive/chat_{sid}_final.txt",
                f"files/{sid}/{record.file_id}",
                f"files/{sid}/{record.file_id}.thumb.jpg",
            ]
            obj = await s3.get_object(Bucket=bucket, Key=f"archive/chat_{sid}_final.txt")
            async with obj["Body"] as stream:
                assert await stream.read() == archived
            assert obj["ContentType"].startswith("text/plain")
            picture_obj = await s3.head_object(Bucket=bucket, Key=f"files/{sid}/{record.file_id}")
            assert picture_obj["ContentLength"] == len(data)
            assert picture_obj["ContentType"] == "image/png"
            as_json = await s3.get_object(Bucket=bucket, Key=f"archive/chat_{sid}_final.json")
            async with as_json["Body"] as stream:
                parsed = orjson.loads(await stream.read())
            assert [m["sender_name"] for m in parsed["messages"]] == ["Alice", "Alice"]
            assert parsed["messages"][1]["file"] == record.info()
    finally:
        await s3parts.bus.close()
        await s3parts.blobs.close()
        await s3parts.database.close()


async def test_end_idle_spares_a_session_that_became_active_during_the_run(
    parts: Components,
) -> None:
    alice, bob = users(2)
    first = await group(parts, alice, bob)
    second = await group(parts, alice, bob)
    await send(parts, alice, first, "x")
    await send(parts, alice, second, "y")
    timeout = parts.archives.settings.idle_timeout
    await set_times(parts, first, updated_at=utcnow() - timeout - timedelta(hours=2))
    await set_times(parts, second, updated_at=utcnow() - timeout - timedelta(hours=1))

    async def bob_writes_to_the_second(session: Session) -> None:
        # While the job is busy with the first (archiving it), bob writes in the second.
        if session.session_id == first:
            await send(parts, bob, second, "I am still here!")

    parts.sessions.end_listeners.insert(0, bob_writes_to_the_second)
    await parts.archives.end_idle()
    assert (await session_row(parts, first)).status == "archived"
    assert (await session_row(parts, second)).status == "active"


async def test_deleting_a_session_removes_its_snapshots(
    parts: Components, monkeypatch: pytest.MonkeyPatch
) -> None:
    Clock(monkeypatch)
    (alice,) = users(1)
    sid = await group(parts, alice)
    await send(parts, alice, sid, "soon gone")
    await drain_snapshots(parts.archives)
    assert len(await parts.blobs.list(f"temp/chat_{sid}_snapshot_")) == 1
    await parts.sessions.delete(alice, sid)
    assert await parts.blobs.list(f"temp/chat_{sid}_") == []
