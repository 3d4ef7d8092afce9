"""Files: uploads checked by content, thumbnails, attaching, downloads, and what deleting a
message does to its file, on the real services and stores of each database (blobs in a
local directory under tmp_path)."""

from __future__ import annotations

import io
import os
from datetime import timedelta
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import select

from chatservice import events
from chatservice.components import Components
from chatservice.domain import FileRecord, Message, Principal, utcnow
from chatservice.services.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
    ServiceError,
    SessionClosed,
    TooLarge,
    UnsupportedMediaType,
)
from chatservice.services.files import Download, Upload
from chatservice.store.tables import chat_files
from tests.integration.helpers import BusTap, group, send, users

ELF = b"\x7fELF\x02\x01\x01\x00" + bytes(248)
PE = b"MZ\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00\xff\xff\x00\x00" + bytes(240)
PDF = b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n<< /Root 1 0 R >>\n%%EOF\n"
TEXT = "first line\n두 번째 줄\n".encode()


def png(size: tuple[int, int] = (640, 480)) -> bytes:
    """A noisy (so incompressible) RGB PNG: a truncated copy loses real pixel data."""
    image = Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def transparent_png(size: tuple[int, int] = (100, 80)) -> bytes:
    image = Image.new("RGBA", size, (255, 0, 0, 128))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def bomb_png() -> bytes:
    """64 million pixels in a few kilobytes (MAX_IMAGE_PIXELS is 40 million)."""
    out = io.BytesIO()
    Image.new("1", (8000, 8000)).save(out, "PNG")
    return out.getvalue()


def upload_of(data: bytes, name: str | None, declared: str | None) -> Upload:
    return Upload(name=name, declared_type=declared, source=io.BytesIO(data), size=len(data))


async def put(
    parts: Components,
    who: Principal,
    session_id: str,
    data: bytes,
    name: str | None = "photo.png",
    declared: str | None = "image/png",
    *,
    attach: bool = True,
    caption: str | None = None,
    client_msg_id: str | None = None,
) -> tuple[FileRecord, Message | None]:
    session = await parts.files.check_can_upload(who, session_id)
    return await parts.files.upload(
        who,
        session,
        upload_of(data, name, declared),
        caption=caption,
        attach=attach,
        client_msg_id=client_msg_id,
    )


async def blob_keys(parts: Components, session_id: str) -> list[str]:
    return await parts.blobs.list(f"files/{session_id}/")


async def file_rows(parts: Components, session_id: str) -> list[str]:
    """Every chat_files row of the session, whatever its state."""
    async with parts.database.read() as conn:
        rows = await conn.execute(
            select(chat_files.c.file_id)
            .where(chat_files.c.session_id == session_id)
            .order_by(chat_files.c.id)
        )
        return list(rows.scalars())


async def fetch(parts: Components, found: Download) -> bytes:
    chunks = [chunk async for chunk in parts.files.stream(found, 0, found.size - 1)]
    return b"".join(chunks)


async def history(parts: Components, who: Principal, session_id: str) -> list[Message]:
    return (await parts.messages.page(who, session_id, before=None, after=None, limit=50)).messages


def assert_error(exc: pytest.ExceptionInfo[Any], kind: type[ServiceError], code: str) -> None:
    assert type(exc.value) is kind, exc.value
    assert exc.value.code == code
    assert exc.value.status == kind.status


# -- uploads -----------------------------------------------------------------------------


async def test_image_upload_stores_file_thumbnail_and_sends_a_file_message(
    parts: Components,
) -> None:
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    data = png()
    tap = BusTap()
    await parts.bus.subscribe([events.session_channel(sid)], tap)
    try:
        record, message = await put(
            parts, alice, sid, data, name="../sunset photo.png", caption="저녁 노을"
        )
    finally:
        await parts.bus.unsubscribe([events.session_channel(sid)], tap)

    assert record.file_id.startswith("file_")
    assert record.session_id == sid
    assert record.file_name == "sunset photo.png"
    assert (record.file_type, record.file_size) == ("image/png", len(data))
    assert record.uploaded_by == alice.user_id
    assert record.storage_key == f"files/{sid}/{record.file_id}"
    assert record.thumbnail_key == f"files/{sid}/{record.file_id}.thumb.jpg"

    assert message is not None
    assert record.message_id == message.message_id
    assert (message.message_type, message.content, message.seq) == ("file", "저녁 노을", 1)
    info = {
        "file_id": record.file_id,
        "name": "sunset photo.png",
        "type": "image/png",
        "size": len(data),
        "url": f"/files/{record.file_id}",
        "thumbnail_url": f"/files/{record.file_id}/thumb",
    }
    assert message.metadata == {"file_info": info}

    assert await blob_keys(parts, sid) == [record.storage_key, record.thumbnail_key]
    assert await parts.blobs.get_bytes(record.storage_key) == data
    thumb = Image.open(io.BytesIO(await parts.blobs.get_bytes(record.thumbnail_key)))
    assert thumb.format == "JPEG"
    assert max(thumb.size) == parts.settings.thumbnail_size
    assert thumb.size == (320, 240)

    (event,) = tap.events
    assert event["type"] == "message"
    assert (event["message_id"], event["message_type"]) == (message.message_id, "file")
    assert event["metadata"] == {"file_info": info}

    (stored,) = await history(parts, bob, sid)
    assert stored.message_id == message.message_id
    assert stored.metadata == {"file_info": info}
    assert await file_rows(parts, sid) == [record.file_id]


async def test_transparent_image_gets_a_png_thumbnail(parts: Components) -> None:
    (alice,) = users(1)
    sid = await group(parts, alice)
    record, message = await put(parts, alice, sid, transparent_png(), name="dot.png")
    assert message is not None
    assert record.thumbnail_key == f"files/{sid}/{record.file_id}.thumb.png"
    found = await parts.files.download(alice, record.file_id, thumbnail=True)
    assert found.content_type == "image/png"
    assert found.key == record.thumbnail_key
    thumb = Image.open(io.BytesIO(await fetch(parts, found)))
    assert (thumb.format, thumb.mode, thumb.size) == ("PNG", "RGBA", (100, 80))


async def test_upload_without_attach_sends_no_message(parts: Components) -> None:
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    tap = BusTap()
    await parts.bus.subscribe([events.session_channel(sid)], tap)
    try:
        record, message = await put(parts, alice, sid, png((50, 50)), attach=False)
    finally:
        await parts.bus.unsubscribe([events.session_channel(sid)], tap)
    assert message is None
    assert record.message_id is None
    assert tap.events == []
    assert await history(parts, alice, sid) == []
    assert await blob_keys(parts, sid) == [record.storage_key, record.thumbnail_key]
    assert await file_rows(parts, sid) == [record.file_id]


async def test_text_upload_has_no_thumbnail(parts: Components) -> None:
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    record, message = await put(parts, alice, sid, TEXT, name="notes.txt", declared="text/plain")
    assert message is not None
    assert (record.file_type, record.thumbnail_key, record.thumbnail_url) == (
        "text/plain",
        None,
        None,
    )
    assert message.content == ""
    assert message.metadata is not None
    assert message.metadata["file_info"]["thumbnail_url"] is None
    assert await blob_keys(parts, sid) == [record.storage_key]

    found = await parts.files.download(bob, record.file_id, thumbnail=False)
    assert (found.size, found.content_type, found.file_name) == (
        len(TEXT),
        "text/plain",
        "notes.txt",
    )
    assert await fetch(parts, found) == TEXT
    with pytest.raises(NotFound) as refused:
        await parts.files.download(bob, record.file_id, thumbnail=True)
    assert_error(refused, NotFound, "NO_THUMBNAIL")


REFUSALS = [
    pytest.param(ELF, "image/png", UnsupportedMediaType, "UNSUPPORTED_FILE_TYPE", id="elf"),
    pytest.param(PE, "image/png", UnsupportedMediaType, "UNSUPPORTED_FILE_TYPE", id="pe"),
    pytest.param(PDF, "image/png", UnsupportedMediaType, "FILE_TYPE_MISMATCH", id="pdf-as-png"),
    pytest.param(b"", "text/plain", InvalidInput, "EMPTY_FILE", id="empty"),
    pytest.param(None, "image/png", InvalidInput, "INVALID_IMAGE", id="truncated-png"),
    pytest.param("bomb", "image/png", InvalidInput, "IMAGE_TOO_LARGE", id="bomb"),
]


@pytest.mark.parametrize(("data", "declared", "kind", "code"), REFUSALS)
async def test_refused_upload_leaves_no_blob_and_no_row(
    parts: Components,
    data: bytes | str | None,
    declared: str,
    kind: type[ServiceError],
    code: str,
) -> None:
    if data is None:
        whole = png()
        data = whole[: len(whole) // 2]
    elif data == "bomb":
        data = bomb_png()
    assert isinstance(data, bytes)
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    tap = BusTap()
    await parts.bus.subscribe([events.session_channel(sid)], tap)
    try:
        with pytest.raises(kind) as refused:
            await put(parts, alice, sid, data, declared=declared)
    finally:
        await parts.bus.unsubscribe([events.session_channel(sid)], tap)
    assert_error(refused, kind, code)
    assert await blob_keys(parts, sid) == []
    assert await parts.blobs.list("files/") == []
    assert await file_rows(parts, sid) == []
    assert await history(parts, alice, sid) == []
    assert tap.events == []


async def test_upload_over_the_size_limit_is_too_large(parts: Components) -> None:
    (alice,) = users(1)
    sid = await group(parts, alice)
    limit = parts.settings.max_file_size
    with pytest.raises(TooLarge) as refused:
        await put(parts, alice, sid, b"a" * (limit + 1), name="big.txt", declared="text/plain")
    assert_error(refused, TooLarge, "CONTENT_TOO_LARGE")
    assert await parts.blobs.list("files/") == []
    assert await file_rows(parts, sid) == []
    # Exactly the limit is accepted.
    record, _ = await put(parts, alice, sid, b"a" * limit, name="big.txt", declared="text/plain")
    assert record.file_size == limit
    assert await parts.blobs.size(record.storage_key) == limit


async def test_who_may_upload(parts: Components) -> None:
    alice, bob, mallory = users(3)
    sid = await group(parts, alice, bob)
    assert (await parts.files.check_can_upload(bob, sid)).session_id == sid
    with pytest.raises(Forbidden):
        await parts.files.check_can_upload(mallory, sid)

    deleted = await group(parts, alice, bob)
    await parts.sessions.delete(alice, deleted)
    with pytest.raises(NotFound) as gone:
        await parts.files.check_can_upload(alice, deleted)
    assert gone.value.code == "SESSION_NOT_FOUND"

    ended = await group(parts, alice, bob)
    await send(parts, alice, ended, "hello")
    await parts.sessions.end(alice, ended)
    for who in (alice, bob):
        with pytest.raises(SessionClosed) as closed:
            await parts.files.check_can_upload(who, ended)
        assert (closed.value.code, closed.value.status) == ("SESSION_CLOSED", 409)


async def test_upload_into_a_session_ended_after_the_check_leaves_nothing(
    parts: Components,
) -> None:
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    session = await parts.files.check_can_upload(bob, sid)
    await parts.sessions.end(alice, sid)
    with pytest.raises(SessionClosed):
        await parts.files.upload(
            bob, session, upload_of(TEXT, "a.txt", "text/plain"), caption=None, attach=True
        )
    assert await blob_keys(parts, sid) == []
    assert await file_rows(parts, sid) == []


# -- attaching -----------------------------------------------------------------------------


async def test_attach_an_earlier_upload(parts: Components) -> None:
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    await send(parts, bob, sid, "send me the file")
    record, _ = await put(parts, alice, sid, TEXT, "a.txt", "text/plain", attach=False)
    session = await parts.files.check_can_upload(alice, sid)
    tap = BusTap()
    await parts.bus.subscribe([events.session_channel(sid)], tap)
    try:
        message = await parts.files.attach(alice, session, record.file_id, "here it is")
    finally:
        await parts.bus.unsubscribe([events.session_channel(sid)], tap)
    assert (message.seq, message.message_type, message.content) == (2, "file", "here it is")
    assert message.metadata == {"file_info": record.info()}
    assert [e["message_id"] for e in tap.of_type("message")] == [message.message_id]
    stored = await parts.files.store.get(record.file_id)
    assert stored is not None and stored.message_id == message.message_id
    # Now on a message, the other participant can see it too.
    found = await parts.files.download(bob, record.file_id, thumbnail=False)
    assert await fetch(parts, found) == TEXT

    with pytest.raises(Conflict) as twice:
        await parts.files.attach(alice, session, record.file_id, "again")
    assert_error(twice, Conflict, "FILE_NOT_ATTACHABLE")
    assert [m.seq for m in await history(parts, alice, sid)] == [1, 2]
    assert await parts.history.last_seq(sid) == 2  # the refused send gave its seq back


async def test_only_the_uploader_attaches_and_only_in_its_session(parts: Components) -> None:
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    other = await group(parts, alice, bob)
    record, _ = await put(parts, alice, sid, TEXT, "a.txt", "text/plain", attach=False)

    bob_session = await parts.files.check_can_upload(bob, sid)
    with pytest.raises(Conflict) as not_his:
        await parts.files.attach(bob, bob_session, record.file_id, None)
    assert_error(not_his, Conflict, "FILE_NOT_ATTACHABLE")

    other_session = await parts.files.check_can_upload(alice, other)
    with pytest.raises(NotFound) as elsewhere:
        await parts.files.attach(alice, other_session, record.file_id, None)
    assert_error(elsewhere, NotFound, "FILE_NOT_FOUND")

    with pytest.raises(NotFound):
        await parts.files.attach(alice, other_session, "file_doesnotexist", None)

    assert await history(parts, alice, sid) == []
    assert await history(parts, alice, other) == []
    stored = await parts.files.store.get(record.file_id)
    assert stored is not None and stored.message_id is None


# -- downloads -----------------------------------------------------------------------------


async def test_download_is_for_participants_only(parts: Components) -> None:
    alice, bob, mallory = users(3)
    sid = await group(parts, alice, bob)
    data = png((200, 100))
    record, _ = await put(parts, alice, sid, data, name="p.png")

    for who in (alice, bob):
        found = await parts.files.download(who, record.file_id, thumbnail=False)
        assert (found.size, found.content_type, found.file_name) == (
            len(data),
            "image/png",
            "p.png",
        )
        assert found.etag == f'"{record.file_id}-{len(data)}"'
        assert await fetch(parts, found) == data
        thumb = await parts.files.download(who, record.file_id, thumbnail=True)
        assert (thumb.content_type, thumb.file_name) == ("image/jpeg", "thumb-p.png")
        assert Image.open(io.BytesIO(await fetch(parts, thumb))).size == (200, 100)  # no upscaling

    middle = [c async for c in parts.files.stream(found, 10, 19)]
    assert b"".join(middle) == data[10:20]

    for thumbnail in (False, True):
        with pytest.raises(Forbidden):
            await parts.files.download(mallory, record.file_id, thumbnail=thumbnail)
    with pytest.raises(NotFound) as missing:
        await parts.files.download(alice, "file_doesnotexist", thumbnail=False)
    assert missing.value.code == "FILE_NOT_FOUND"


async def test_unattached_upload_is_visible_only_to_its_uploader(parts: Components) -> None:
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    record, _ = await put(parts, alice, sid, TEXT, "a.txt", "text/plain", attach=False)
    found = await parts.files.download(alice, record.file_id, thumbnail=False)
    assert await fetch(parts, found) == TEXT
    with pytest.raises(NotFound) as hidden:
        await parts.files.download(bob, record.file_id, thumbnail=False)
    assert hidden.value.code == "FILE_NOT_FOUND"


async def test_download_of_a_deleted_session_is_not_found(parts: Components) -> None:
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    record, _ = await put(parts, alice, sid, TEXT, "a.txt", "text/plain")
    await parts.sessions.delete(alice, sid)
    for who in (alice, bob):
        with pytest.raises(NotFound):
            await parts.files.download(who, record.file_id, thumbnail=False)


# -- editing and deleting messages -----------------------------------------------------------


async def test_deleting_a_file_message_removes_the_file(parts: Components) -> None:
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    record, message = await put(parts, alice, sid, png((64, 64)))
    assert message is not None
    keep, kept = await put(parts, alice, sid, TEXT, "keep.txt", "text/plain")
    assert kept is not None
    await parts.messages.delete(alice, message.message_id)
    for who in (alice, bob):
        for thumbnail in (False, True):
            with pytest.raises(NotFound) as gone:
                await parts.files.download(who, record.file_id, thumbnail=thumbnail)
            assert gone.value.code == "FILE_NOT_FOUND"
    assert await blob_keys(parts, sid) == [keep.storage_key]
    assert [m.message_id for m in await history(parts, bob, sid)] == [kept.message_id]
    # The other file is untouched.
    found = await parts.files.download(bob, keep.file_id, thumbnail=False)
    assert await fetch(parts, found) == TEXT


async def test_edit_and_delete_are_for_the_sender(parts: Components) -> None:
    alice, bob, mallory = users(3)
    sid = await group(parts, alice, bob)
    await send(parts, alice, sid, "original")
    (message,) = await history(parts, alice, sid)

    for who, kind in ((bob, Forbidden), (mallory, Forbidden)):
        with pytest.raises(kind):
            await parts.messages.edit(who, message.message_id, "hijacked")
        with pytest.raises(kind):
            await parts.messages.delete(who, message.message_id)
    for call in (
        parts.messages.edit(alice, "msg_doesnotexist", "x"),
        parts.messages.delete(alice, "msg_doesnotexist"),
    ):
        with pytest.raises(NotFound) as missing:
            await call
        assert missing.value.code == "MESSAGE_NOT_FOUND"
    for empty in ("", "   \n"):
        with pytest.raises(InvalidInput) as refused:
            await parts.messages.edit(alice, message.message_id, empty)
        assert refused.value.code == "EMPTY_CONTENT"

    (unchanged,) = await history(parts, bob, sid)
    assert (unchanged.content, unchanged.is_edited) == ("original", False)


async def test_edit_publishes_message_updated(parts: Components) -> None:
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    await send(parts, alice, sid, "helo")
    (message,) = await history(parts, alice, sid)
    tap = BusTap()
    await parts.bus.subscribe([events.session_channel(sid)], tap)
    try:
        edited = await parts.messages.edit(alice, message.message_id, "hello 안녕")
    finally:
        await parts.bus.unsubscribe([events.session_channel(sid)], tap)
    assert (edited.content, edited.is_edited, edited.seq) == ("hello 안녕", True, 1)
    assert edited.edited_at is not None
    (event,) = tap.events
    assert event["type"] == "message_updated"
    assert (event["message_id"], event["seq"], event["content"]) == (
        message.message_id,
        1,
        "hello 안녕",
    )
    assert event["is_edited"] is True
    assert event["timestamp"] == event["edited_at"]
    (stored,) = await history(parts, bob, sid)
    assert (stored.content, stored.is_edited) == ("hello 안녕", True)


async def test_a_file_caption_may_be_emptied(parts: Components) -> None:
    (alice,) = users(1)
    sid = await group(parts, alice)
    record, message = await put(parts, alice, sid, TEXT, "a.txt", "text/plain", caption="cap")
    assert message is not None
    edited = await parts.messages.edit(alice, message.message_id, "")
    assert (edited.content, edited.message_type) == ("", "file")
    assert edited.metadata == {"file_info": record.info()}


async def test_delete_publishes_message_deleted_and_leaves_history(parts: Components) -> None:
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    for text in ("one", "two", "three"):
        await send(parts, alice, sid, text)
    one, two, three = await history(parts, alice, sid)
    tap = BusTap()
    await parts.bus.subscribe([events.session_channel(sid)], tap)
    try:
        deleted = await parts.messages.delete(alice, two.message_id)
    finally:
        await parts.bus.unsubscribe([events.session_channel(sid)], tap)
    assert deleted.message_id == two.message_id
    (event,) = tap.events
    assert event == {
        "type": "message_deleted",
        "session_id": sid,
        "message_id": two.message_id,
        "seq": 2,
        "timestamp": event["timestamp"],
    }
    assert event["timestamp"].endswith("Z")

    page = await parts.messages.page(bob, sid, before=None, after=None, limit=50)
    assert [m.seq for m in page.messages] == [1, 3]
    assert page.total == 2
    assert [
        m.seq
        for m in (await parts.messages.page(bob, sid, before="3", after=None, limit=1)).messages
    ] == [1]
    assert [e.seq for e in await parts.history.after(sid, 0, 10)] == [1, 3]
    # Gone for good: neither edited nor deleted again.
    with pytest.raises(NotFound):
        await parts.messages.delete(alice, two.message_id)
    with pytest.raises(NotFound):
        await parts.messages.edit(alice, two.message_id, "back")
    assert one.content == "one" and three.content == "three"


async def test_messages_of_an_ended_session_cannot_change(parts: Components) -> None:
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    await send(parts, bob, sid, "hi")
    (message,) = await history(parts, bob, sid)
    await parts.sessions.end(alice, sid)
    with pytest.raises(SessionClosed):
        await parts.messages.edit(bob, message.message_id, "changed")
    with pytest.raises(SessionClosed):
        await parts.messages.delete(bob, message.message_id)


# -- retries and housekeeping --------------------------------------------------------------


async def test_retried_upload_returns_the_original(parts: Components) -> None:
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    data = png((80, 60))
    first, original = await put(parts, alice, sid, data, client_msg_id="upload-1")
    assert original is not None
    tap = BusTap()
    await parts.bus.subscribe([events.session_channel(sid)], tap)
    try:
        again, repeated = await put(parts, alice, sid, data, client_msg_id="upload-1")
    finally:
        await parts.bus.unsubscribe([events.session_channel(sid)], tap)
    assert repeated is not None
    assert repeated.message_id == original.message_id
    assert again.file_id == first.file_id
    assert again.message_id == original.message_id
    assert tap.events == []
    assert await blob_keys(parts, sid) == [first.storage_key, first.thumbnail_key]
    assert await file_rows(parts, sid) == [first.file_id]
    assert [m.message_id for m in await history(parts, bob, sid)] == [original.message_id]
    assert await parts.history.last_seq(sid) == 1


async def test_purge_removes_only_unattached_uploads(parts: Components) -> None:
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    loose, _ = await put(parts, alice, sid, png((40, 40)), attach=False)
    loose_text, _ = await put(parts, bob, sid, TEXT, "b.txt", "text/plain", attach=False)
    kept, message = await put(parts, alice, sid, TEXT, "a.txt", "text/plain")
    assert message is not None

    # Nothing is old enough yet.
    await parts.files.purge_unattached(utcnow() - timedelta(hours=1))
    assert len(await file_rows(parts, sid)) == 3

    cutoff = utcnow() + timedelta(minutes=1)
    removed = 0
    while batch := await parts.files.purge_unattached(cutoff):
        removed += batch  # the database is shared: other tests' uploads may go too
    assert removed >= 2
    assert await file_rows(parts, sid) == [kept.file_id]
    assert await blob_keys(parts, sid) == [kept.storage_key]
    assert await parts.files.store.get(loose.file_id) is None
    assert await parts.files.store.get(loose_text.file_id) is None
    found = await parts.files.download(bob, kept.file_id, thumbnail=False)
    assert await fetch(parts, found) == TEXT


async def test_upload_reusing_a_text_messages_client_msg_id_is_a_conflict(
    parts: Components,
) -> None:
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    await send(parts, alice, sid, "hello", client_msg_id="k-1")
    with pytest.raises(Conflict) as reused:
        await put(parts, alice, sid, TEXT, "a.txt", "text/plain", client_msg_id="k-1")
    assert_error(reused, Conflict, "CLIENT_MSG_ID_REUSED")
    # Nothing of the refused upload is left, and the text message is as it was.
    assert await blob_keys(parts, sid) == []
    assert await file_rows(parts, sid) == []
    (message,) = await history(parts, bob, sid)
    assert (message.message_type, message.content, message.client_msg_id) == (
        "text",
        "hello",
        "k-1",
    )


async def test_purge_spares_an_upload_attached_after_it_was_listed(parts: Components) -> None:
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    record, _ = await put(parts, alice, sid, TEXT, "late.txt", "text/plain", attach=False)
    listed = await parts.files.store.unattached_before(utcnow() + timedelta(minutes=1), 10_000)
    assert record.file_id in {f.file_id for f in listed}
    session, _ = await parts.sessions.require_member(alice, sid)
    message = await parts.files.attach(alice, session, record.file_id, "here it is")
    # The purge read the list before the attach; removing must now leave the file alone.
    assert await parts.files.store.remove_unattached(record.file_id) is False
    found = await parts.files.download(bob, record.file_id, thumbnail=False)
    assert await fetch(parts, found) == TEXT
    assert (await parts.files.store.get(record.file_id)).message_id == message.message_id  # type: ignore[union-attr]
