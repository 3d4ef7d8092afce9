"""Files end to end on the shared server (SQLite and PostgreSQL): uploads of every allowed
type, the `file` message on every participant's socket, byte-exact downloads, thumbnails
(size, EXIF rotation, no metadata), download headers, ranges, conditional requests, files
sent later over WebSocket (`attach=false`), and editing and deleting file messages.

The image/PDF builders and small helpers here are shared by `test_files_hostile.py` and
`test_archives.py`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import ExifTags, Image
from websockets.asyncio.client import ClientConnection

from tests.conftest import ServerProcess
from tests.e2e.conftest import (
    User,
    Users,
    bearer,
    frames_until_pong,
    recv_json,
    recv_until,
    ws_connect,
)

API = "/api/chat"
JSON = dict[str, Any]
TEXT = "안녕하세요, 첨부 파일입니다.\nplain text, line two\n".encode()
DOWNLOAD_SECURITY = {
    "x-content-type-options": "nosniff",
    "content-security-policy": "default-src 'none'; sandbox",
    "accept-ranges": "bytes",
}

# -- content builders (shared with the other file tests) ----------------------------------


def png_bytes(
    size: tuple[int, int] = (64, 48), color: Any = (200, 30, 30), mode: str = "RGB"
) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, "PNG")
    return buffer.getvalue()


def two_colour(size: tuple[int, int], first: Any, second: Any) -> Image.Image:
    """Left half `first`, right half `second`: shows which way a picture was turned."""
    im = Image.new("RGB", size, second)
    im.paste(Image.new("RGB", (size[0] // 2, size[1]), first), (0, 0))
    return im


def jpeg_with_exif(size: tuple[int, int] = (400, 200), orientation: int = 6) -> bytes:
    """A JPEG stored landscape (red left, blue right) whose EXIF says "turn it 90° clockwise",
    with a camera make and a GPS position that must not survive into the thumbnail."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    exif[ExifTags.Base.Make] = "SecretCam"
    exif[ExifTags.Base.ImageDescription] = "home-address"
    exif[ExifTags.IFD.GPSInfo] = {
        ExifTags.GPS.GPSLatitudeRef: "N",
        ExifTags.GPS.GPSLatitude: (37.0, 33.0, 59.0),
        ExifTags.GPS.GPSLongitudeRef: "E",
        ExifTags.GPS.GPSLongitude: (126.0, 58.0, 40.0),
    }
    buffer = io.BytesIO()
    two_colour(size, (255, 0, 0), (0, 0, 255)).save(buffer, "JPEG", exif=exif, quality=95)
    return buffer.getvalue()


def gif_bytes() -> bytes:
    """An animated GIF of two frames (green, then yellow)."""
    frames = [Image.new("RGB", (90, 60), c).convert("P") for c in ((0, 200, 0), (250, 250, 0))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100)
    return buffer.getvalue()


def webp_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (500, 250), (10, 120, 240)).save(buffer, "WEBP", quality=80)
    return buffer.getvalue()


def pdf_bytes(filler: int = 0) -> bytes:
    """A minimal PDF, optionally padded with `filler` bytes of stream data."""
    body = (
        b"%PDF-1.7\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
        b"2 0 obj<</Type/Pages/Kids[]/Count 0>>endobj\n"
    )
    pad = os.urandom(filler) if filler else b""
    return (
        body
        + b"3 0 obj<</Length %d>>stream\n" % len(pad)
        + pad
        + (b"\nendstream endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n")
    )


# -- helpers ------------------------------------------------------------------------------


async def upload(
    http: httpx.AsyncClient,
    headers: dict[str, str],
    sid: str,
    name: str,
    data: bytes,
    content_type: str | None = None,
    **fields: str,
) -> httpx.Response:
    part: Any = (name, data, content_type) if content_type else (name, data)
    return await http.post(
        f"{API}/sessions/{sid}/files", headers=headers, files={"file": part}, data=fields
    )


def assert_created(response: httpx.Response) -> JSON:
    assert response.status_code == 201, response.text
    body: JSON = response.json()
    return body


def blobs_under(root: Path) -> set[str]:
    """Every file below `root` (temporary ones too), relative to it."""
    if not root.exists():
        return set()
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def session_blobs(server: ServerProcess, sid: str) -> set[str]:
    return blobs_under(server.data_dir / "storage" / "files" / sid)


async def new_room(users: Users, title: str = "files") -> tuple[User, User, str]:
    alice, bob = users("alice"), users("bob")
    sid = (await alice.client.create_session(title=title, participants=[bob.id]))["session_id"]
    return alice, bob, sid


async def connected(server: ServerProcess, sid: str, token: str) -> ClientConnection:
    ws = await ws_connect(server, sid, token)
    assert (await recv_json(ws))["type"] == "connected"
    return ws


async def next_message(ws: ClientConnection) -> JSON:
    return await recv_until(ws, "message")


async def pending_messages(ws: ClientConnection) -> list[JSON]:
    """The message frames queued for `ws` right now (presence frames are ignored)."""
    return [f for f in await frames_until_pong(ws) if f.get("type") == "message"]


def image_of(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def near(pixel: Any, colour: tuple[int, int, int], tolerance: int = 40) -> bool:
    return all(abs(int(a) - b) <= tolerance for a, b in zip(pixel[:3], colour, strict=True))


# -- uploads of each type -----------------------------------------------------------------

CASES = [
    ("photo.png", png_bytes((1000, 500)), "image/png", "image/png", (320, 160)),
    ("photo.jpg", jpeg_with_exif(), "image/jpeg", "image/jpeg", (160, 320)),
    ("anim.gif", gif_bytes(), "image/gif", "image/gif", (90, 60)),
    ("pic.webp", webp_bytes(), "image/webp", "image/webp", (320, 160)),
    ("doc.pdf", pdf_bytes(), "application/pdf", "application/pdf", None),
    ("notes.txt", TEXT, "text/plain", "text/plain", None),
]


@pytest.mark.parametrize(
    ("name", "data", "declared", "kind", "thumb_size"),
    CASES,
    ids=[case[0] for case in CASES],
)
async def test_upload_each_type_reaches_the_other_participant_and_downloads_byte_exact(
    http: httpx.AsyncClient,
    server: ServerProcess,
    users: Users,
    name: str,
    data: bytes,
    declared: str,
    kind: str,
    thumb_size: tuple[int, int] | None,
) -> None:
    alice, bob, sid = await new_room(users)
    bob_ws = await connected(server, sid, bob.token)
    alice_ws = await connected(server, sid, alice.token)
    try:
        response = await upload(
            http,
            alice.headers,
            sid,
            name,
            data,
            declared,
            message="자료 보내요",
            client_msg_id="up-1",
        )
        body = assert_created(response)
        file_id = body["file_id"]
        assert file_id.startswith("file_")
        assert body["file_url"] == f"/files/{file_id}"
        assert body["thumbnail_url"] == (f"/files/{file_id}/thumb" if thumb_size else None)
        assert body["file_info"] == {"name": name, "type": kind, "size": len(data)}
        assert body["message_id"].startswith("msg_") and body["seq"] == 1
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", body["uploaded_at"])

        expected_info = {
            "file_id": file_id,
            "name": name,
            "type": kind,
            "size": len(data),
            "url": body["file_url"],
            "thumbnail_url": body["thumbnail_url"],
        }
        for ws in (bob_ws, alice_ws):
            frame = await next_message(ws)
            assert frame["message_id"] == body["message_id"]
            assert frame["seq"] == 1
            assert frame["message_type"] == "file"
            assert frame["sender_id"] == alice.id
            assert frame["content"] == "자료 보내요"
            assert frame["client_msg_id"] == "up-1"
            assert frame["metadata"]["file_info"] == expected_info
        [stored] = (await bob.client.list_messages(sid))["messages"]
        assert stored["message_type"] == "file"
        assert stored["metadata"]["file_info"] == expected_info

        # The bytes stored on disk and served to the other participant are the upload's.
        assert (server.data_dir / "storage" / "files" / sid / file_id).read_bytes() == data
        got = await http.get(body["file_url"], headers=bob.headers)
        assert got.status_code == 200, got.text
        assert got.content == data
        assert got.headers["content-length"] == str(len(data))
        media = "text/plain; charset=utf-8" if kind == "text/plain" else kind
        assert got.headers["content-type"] == media
        disposition = "inline" if kind.startswith("image/") else "attachment"
        assert got.headers["content-disposition"] == f'{disposition}; filename="{name}"'
        for header, value in DOWNLOAD_SECURITY.items():
            assert got.headers[header] == value, header
        assert got.headers["etag"].startswith('"') and file_id in got.headers["etag"]

        thumb = await http.get(f"/files/{file_id}/thumb", headers=bob.headers)
        if thumb_size is None:
            assert thumb.status_code == 404, thumb.text
            assert thumb.json()["error"]["code"] == "NO_THUMBNAIL"
            return
        assert thumb.status_code == 200, thumb.text
        assert thumb.headers["content-type"] in ("image/jpeg", "image/png")
        assert thumb.headers["x-content-type-options"] == "nosniff"
        assert thumb.headers["content-disposition"].startswith("inline;")
        im = image_of(thumb.content)
        assert im.format in ("JPEG", "PNG")
        assert im.format.lower() in thumb.headers["content-type"]
        assert im.size == thumb_size
        assert max(im.size) <= 320
        assert thumb.headers["etag"] != got.headers["etag"]
    finally:
        await bob_ws.close()
        await alice_ws.close()


async def test_jpeg_thumbnail_is_turned_upright_and_carries_no_exif_or_gps(
    http: httpx.AsyncClient, users: Users
) -> None:
    alice, bob, sid = await new_room(users)
    data = jpeg_with_exif((400, 200), orientation=6)
    source = Image.open(io.BytesIO(data))
    assert source.getexif()[ExifTags.Base.Orientation] == 6  # the fixture is what it claims
    assert source.getexif().get_ifd(ExifTags.IFD.GPSInfo)

    body = assert_created(await upload(http, alice.headers, sid, "camera.jpg", data))
    original = await http.get(body["file_url"], headers=bob.headers)
    assert original.content == data  # the original is kept as uploaded, EXIF and all

    thumb = await http.get(body["thumbnail_url"], headers=bob.headers)
    assert thumb.status_code == 200
    im = image_of(thumb.content)
    # Stored 400x200 with red on the left; turned 90° clockwise it is 200x400, red on top.
    assert im.size == (160, 320)
    rgb = im.convert("RGB")
    assert near(rgb.getpixel((80, 40)), (255, 0, 0)), rgb.getpixel((80, 40))
    assert near(rgb.getpixel((80, 280)), (0, 0, 255)), rgb.getpixel((80, 280))
    # No metadata at all: no EXIF block (so no orientation to apply twice, no GPS).
    assert len(im.getexif()) == 0
    assert "exif" not in im.info
    for secret in (b"Exif", b"SecretCam", b"home-address", b"GPS"):
        assert secret not in thumb.content, secret


async def test_transparent_png_gets_a_png_thumbnail(http: httpx.AsyncClient, users: Users) -> None:
    alice, _, sid = await new_room(users)
    data = png_bytes((640, 640), (0, 128, 0, 100), mode="RGBA")
    body = assert_created(await upload(http, alice.headers, sid, "glass.png", data, "image/png"))
    thumb = await http.get(body["thumbnail_url"], headers=alice.headers)
    assert thumb.headers["content-type"] == "image/png"
    im = image_of(thumb.content)
    assert im.size == (320, 320)
    assert im.mode == "RGBA" and im.getpixel((5, 5))[3] == 100


async def test_korean_file_names_are_kept_and_sent_with_rfc5987(
    http: httpx.AsyncClient, users: Users
) -> None:
    alice, bob, sid = await new_room(users)
    body = assert_created(
        await upload(http, alice.headers, sid, "보고서 2024.pdf", pdf_bytes(), "application/pdf")
    )
    assert body["file_info"]["name"] == "보고서 2024.pdf"
    got = await http.get(body["file_url"], headers=bob.headers)
    assert got.headers["content-disposition"] == (
        'attachment; filename="___ 2024.pdf"; '
        "filename*=UTF-8''%EB%B3%B4%EA%B3%A0%EC%84%9C%202024.pdf"
    )
    # The header is plain ASCII, as HTTP/1.1 wants.
    assert got.headers.raw[0][1].isascii()
    assert all(value.isascii() for _, value in got.headers.raw)

    photo = assert_created(await upload(http, alice.headers, sid, "사진.png", png_bytes()))
    got = await http.get(photo["file_url"], headers=bob.headers)
    assert got.headers["content-disposition"] == (
        "inline; filename=\"__.png\"; filename*=UTF-8''%EC%82%AC%EC%A7%84.png"
    )
    thumb = await http.get(photo["thumbnail_url"], headers=bob.headers)
    assert thumb.headers["content-disposition"].endswith(
        "filename*=UTF-8''thumb-%EC%82%AC%EC%A7%84.png"
    )
    # A "%" in a name also needs the exact form (some agents percent-decode filename=).
    pct = assert_created(await upload(http, alice.headers, sid, "100%.txt", b"percent"))
    got = await http.get(pct["file_url"], headers=bob.headers)
    assert got.headers["content-disposition"] == (
        "attachment; filename=\"100_.txt\"; filename*=UTF-8''100%25.txt"
    )


async def test_range_requests(http: httpx.AsyncClient, users: Users) -> None:
    alice, bob, sid = await new_room(users)
    data = bytes(range(256)) * 4  # 1024 distinct-looking bytes
    data = b"%PDF-1.4\n" + data[9:]
    body = assert_created(await upload(http, alice.headers, sid, "r.pdf", data))
    url, size = body["file_url"], len(data)
    etag = (await http.get(url, headers=bob.headers)).headers["etag"]

    async def get(range_value: str, **extra: str) -> httpx.Response:
        return await http.get(url, headers={**bob.headers, "Range": range_value, **extra})

    for header, start, end in [
        ("bytes=0-9", 0, 9),
        ("bytes=1000-", 1000, size - 1),
        ("bytes=-5", size - 5, size - 1),
        ("bytes=1020-5000", 1020, size - 1),
        ("bytes=0-0", 0, 0),
        ("bytes=-5000", 0, size - 1),
        ("bytes=512-767", 512, 767),
    ]:
        got = await get(header)
        assert got.status_code == 206, (header, got.status_code, got.text)
        assert got.headers["content-range"] == f"bytes {start}-{end}/{size}", header
        assert got.headers["content-length"] == str(end - start + 1), header
        assert got.content == data[start : end + 1], header
        assert got.headers["etag"] == etag
        assert got.headers["accept-ranges"] == "bytes"

    for header in ("bytes=1024-", "bytes=5000-6000", "bytes=-0"):
        got = await get(header)
        assert got.status_code == 416, (header, got.status_code)
        assert got.headers["content-range"] == f"bytes */{size}", header
        assert got.json()["error"]["code"] == "RANGE_NOT_SATISFIABLE"

    # Several ranges, nonsense, and a stale If-Range: the whole file with 200.
    for header, extra in [
        ("bytes=0-1,5-6", {}),
        ("bytes=0-1, 10-20", {}),
        ("items=0-5", {}),
        ("bytes=abc", {}),
        ("bytes=0-9", {"If-Range": '"some-other-etag"'}),
    ]:
        got = await get(header, **extra)
        assert got.status_code == 200, (header, got.status_code)
        assert got.content == data, header
        assert "content-range" not in got.headers
    # A matching If-Range still gets the range.
    got = await get("bytes=0-9", **{"If-Range": etag})
    assert got.status_code == 206 and got.content == data[:10]

    # Ranges work on thumbnails too.
    photo = assert_created(await upload(http, alice.headers, sid, "p.png", png_bytes()))
    whole = (await http.get(photo["thumbnail_url"], headers=bob.headers)).content
    part = await http.get(photo["thumbnail_url"], headers={**bob.headers, "Range": "bytes=0-3"})
    assert part.status_code == 206 and part.content == whole[:4]


async def test_if_none_match_gives_304(http: httpx.AsyncClient, users: Users) -> None:
    alice, bob, sid = await new_room(users)
    body = assert_created(await upload(http, alice.headers, sid, "cached.png", png_bytes()))
    first = await http.get(body["file_url"], headers=bob.headers)
    etag = first.headers["etag"]
    for value in (etag, f"W/{etag}", f'"nope", {etag}'):
        again = await http.get(body["file_url"], headers={**bob.headers, "If-None-Match": value})
        assert again.status_code == 304, value
        assert again.content == b""
        assert again.headers["etag"] == etag
    other = await http.get(body["file_url"], headers={**bob.headers, "If-None-Match": '"x"'})
    assert other.status_code == 200 and other.content == first.content

    thumb = await http.get(body["thumbnail_url"], headers=bob.headers)
    thumb_etag = thumb.headers["etag"]
    again = await http.get(
        body["thumbnail_url"], headers={**bob.headers, "If-None-Match": thumb_etag}
    )
    assert again.status_code == 304
    # The file's ETag does not validate the thumbnail (they are different representations).
    crossed = await http.get(body["thumbnail_url"], headers={**bob.headers, "If-None-Match": etag})
    assert crossed.status_code == 200


async def test_attach_false_then_ws_file_frame(
    http: httpx.AsyncClient, server: ServerProcess, users: Users
) -> None:
    alice, bob, sid = await new_room(users)
    bob_ws = await connected(server, sid, bob.token)
    alice_ws = await connected(server, sid, alice.token)
    try:
        data = png_bytes((50, 50), (1, 2, 3))
        body = assert_created(
            await upload(http, alice.headers, sid, "later.png", data, attach="false")
        )
        assert body["message_id"] is None and body["seq"] is None
        file_id = body["file_id"]
        # Nothing was sent, and nobody but the uploader can fetch the file yet.
        assert await pending_messages(bob_ws) == []
        assert (await bob.client.list_messages(sid))["total"] == 0
        assert (await http.get(body["file_url"], headers=alice.headers)).content == data
        for url in (body["file_url"], body["thumbnail_url"]):
            hidden = await http.get(url, headers=bob.headers)
            assert hidden.status_code == 404, url

        await alice_ws.send(
            json.dumps(
                {"type": "file", "file_id": file_id, "message": "여기요", "client_msg_id": "f-1"}
            )
        )
        for ws in (alice_ws, bob_ws):
            frame = await next_message(ws)
            assert frame["message_type"] == "file"
            assert frame["content"] == "여기요"
            assert frame["client_msg_id"] == "f-1"
            assert frame["sender_id"] == alice.id
            assert frame["metadata"]["file_info"]["file_id"] == file_id
            assert frame["metadata"]["file_info"]["name"] == "later.png"
        assert (await http.get(body["file_url"], headers=bob.headers)).content == data
        assert (await http.get(body["thumbnail_url"], headers=bob.headers)).status_code == 200

        # A file goes on one message only; the socket stays usable after the refusal.
        await alice_ws.send(json.dumps({"type": "file", "file_id": file_id, "message": "again"}))
        error = await recv_until(alice_ws, "error")
        assert error["code"] == "FILE_NOT_ATTACHABLE", error
        assert await pending_messages(bob_ws) == []
        await alice_ws.send(json.dumps({"type": "message", "content": "still here"}))
        assert (await next_message(bob_ws))["content"] == "still here"
        assert (await bob.client.list_messages(sid))["total"] == 2
    finally:
        await bob_ws.close()
        await alice_ws.close()


async def test_upload_retry_with_the_same_client_msg_id_keeps_one_file(
    http: httpx.AsyncClient, server: ServerProcess, users: Users
) -> None:
    alice, bob, sid = await new_room(users)
    first = assert_created(
        await upload(http, alice.headers, sid, "a.png", png_bytes(), client_msg_id="retry-1")
    )
    second = await upload(http, alice.headers, sid, "a.png", png_bytes(), client_msg_id="retry-1")
    assert second.status_code in (200, 201), second.text
    again = second.json()
    assert again["message_id"] == first["message_id"]
    assert again["file_id"] == first["file_id"]
    assert (await bob.client.list_messages(sid))["total"] == 1
    # The retry's own blobs were discarded: one file and its thumbnail remain.
    fid = first["file_id"]
    assert session_blobs(server, sid) == {fid, f"{fid}.thumb.jpg"}


async def test_edit_and_delete_a_file_message(
    http: httpx.AsyncClient, server: ServerProcess, users: Users
) -> None:
    alice, bob, sid = await new_room(users)
    bob_ws = await connected(server, sid, bob.token)
    try:
        body = assert_created(
            await upload(http, alice.headers, sid, "x.png", png_bytes(), message="first caption")
        )
        mid, fid = body["message_id"], body["file_id"]
        await next_message(bob_ws)

        edited = await http.patch(
            f"{API}/messages/{mid}", headers=alice.headers, json={"content": "new caption"}
        )
        assert edited.status_code == 200, edited.text
        message = edited.json()
        assert message["content"] == "new caption"
        assert message["is_edited"] is True and message["edited_at"].endswith("Z")
        assert message["message_type"] == "file"
        assert message["metadata"]["file_info"]["file_id"] == fid
        frame = await recv_until(bob_ws, "message_updated")
        assert frame["message_id"] == mid and frame["content"] == "new caption"
        assert frame["is_edited"] is True and frame["metadata"]["file_info"]["file_id"] == fid
        # A file message's caption may be emptied.
        emptied = await http.patch(
            f"{API}/messages/{mid}", headers=alice.headers, json={"content": ""}
        )
        assert emptied.status_code == 200 and emptied.json()["content"] == ""
        await recv_until(bob_ws, "message_updated")

        # Only the sender edits or deletes.
        for method in ("PATCH", "DELETE"):
            refused = await http.request(
                method, f"{API}/messages/{mid}", headers=bob.headers, json={"content": "mine"}
            )
            assert refused.status_code == 403, refused.text
        assert session_blobs(server, sid) == {fid, f"{fid}.thumb.jpg"}

        deleted = await http.delete(f"{API}/messages/{mid}", headers=alice.headers)
        assert deleted.status_code == 200, deleted.text
        assert deleted.json() == {
            "message": "Message deleted successfully",
            "message_id": mid,
            "session_id": sid,
        }
        frame = await recv_until(bob_ws, "message_deleted")
        assert frame["message_id"] == mid and frame["seq"] == body["seq"]
        for user in (alice, bob):
            for url in (body["file_url"], body["thumbnail_url"]):
                gone = await http.get(url, headers=user.headers)
                assert gone.status_code == 404, (url, gone.text)
                assert gone.json()["error"]["code"] == "FILE_NOT_FOUND"
        assert session_blobs(server, sid) == set()
        assert (await bob.client.list_messages(sid))["total"] == 0
        again = await http.delete(f"{API}/messages/{mid}", headers=alice.headers)
        assert again.status_code == 404
        # The transcript no longer mentions the file.
        transcript = await http.get(f"{API}/sessions/{sid}/transcript", headers=bob.headers)
        assert fid not in transcript.text

        # A text message edits and deletes the same way.
        text = await alice.client.send_message(sid, "typo")
        await next_message(bob_ws)
        fixed = await http.patch(
            f"{API}/messages/{text['message_id']}", headers=alice.headers, json={"content": "fixed"}
        )
        assert fixed.status_code == 200 and fixed.json()["content"] == "fixed"
        assert (await recv_until(bob_ws, "message_updated"))["content"] == "fixed"
        empty = await http.patch(
            f"{API}/messages/{text['message_id']}", headers=alice.headers, json={"content": " "}
        )
        assert empty.status_code == 422
    finally:
        await bob_ws.close()


async def test_five_megabyte_pdf_round_trip(
    http: httpx.AsyncClient, server: ServerProcess, users: Users
) -> None:
    alice, bob, sid = await new_room(users)
    data = pdf_bytes(filler=5 * 1024 * 1024)
    digest = hashlib.sha256(data).hexdigest()
    response = await http.post(
        f"{API}/sessions/{sid}/files",
        headers=alice.headers,
        files={"file": ("big.pdf", data, "application/pdf")},
        timeout=60,
    )
    body = assert_created(response)
    assert body["file_info"] == {"name": "big.pdf", "type": "application/pdf", "size": len(data)}
    async with http.stream("GET", body["file_url"], headers=bob.headers, timeout=60) as got:
        assert got.status_code == 200
        assert got.headers["content-length"] == str(len(data))
        hasher = hashlib.sha256()
        async for chunk in got.aiter_bytes():
            hasher.update(chunk)
    assert hasher.hexdigest() == digest
    middle = await http.get(
        body["file_url"], headers={**bob.headers, "Range": "bytes=3000000-3000099"}
    )
    assert middle.status_code == 206 and middle.content == data[3_000_000:3_000_100]


async def test_downloads_need_a_token(http: httpx.AsyncClient, users: Users) -> None:
    alice, _, sid = await new_room(users)
    body = assert_created(await upload(http, alice.headers, sid, "p.png", png_bytes()))
    for headers in ({}, bearer("not-a-jwt")):
        for url in (body["file_url"], body["thumbnail_url"]):
            got = await http.get(url, headers=headers)
            assert got.status_code == 401, (url, got.text)
            assert got.json()["error"]["code"] == "UNAUTHORIZED"
            assert b"\x89PNG" not in got.content
