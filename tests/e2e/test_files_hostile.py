"""Hostile and malformed uploads, downloads by strangers, and limits.

Every refusal is checked three ways: the status and error code, nothing left behind in
the blob store (no file, no temporary file, no message), and the server still working
for everyone afterwards (a fresh upload and a WebSocket message go through, and the
sockets that were open stay usable).
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import re
import socket
import struct
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from PIL import Image
from websockets.asyncio.client import ClientConnection

from chatservice.auth import TokenCodec
from tests.conftest import ServerProcess, new_user, start_server
from tests.e2e.conftest import (
    User,
    Users,
    bearer,
    close_code,
    frames_until_pong,
    recv_until,
    ws_connect,
)
from tests.e2e.test_files import (
    API,
    JSON,
    blobs_under,
    connected,
    jpeg_with_exif,
    new_room,
    next_message,
    pending_messages,
    png_bytes,
    session_blobs,
    upload,
)

SMALL_MAX_FILE = 65_536
MULTIPART_OVERHEAD = 64 * 1024
PER_MINUTE = 3
BOUNDARY = "hostile-boundary-7f3a"

# -- hostile content ----------------------------------------------------------------------

ELF = b"\x7fELF\x02\x01\x01\x00" + b"\x00" * 8 + b"\x02\x00\x3e\x00" + bytes(range(256)) * 8
PE = b"MZ\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00\xff\xff\x00\x00" + bytes(range(256)) * 8
ZIP = b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + bytes(range(256)) * 4
HTML = b"<!doctype html><html><body><script>fetch('/api/chat/sessions')</script></body></html>"
JS = b"document.cookie='stolen='+document.cookie; alert(1);\n"
SVG = (
    b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(document.domain)">'
    b"<script>alert(1)</script></svg>"
)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


@functools.cache
def bomb_png(side: int = 20_000) -> bytes:
    """A real side x side 1-bit PNG, all zeros: tens of KB that decode to 400 Mpixels."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + (png_chunk(b"IEND", b""))
    )


def lying_png(side: int = 60_000) -> bytes:
    """A PNG whose header claims side x side RGB pixels, with almost no data behind it."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 1000))
        + png_chunk(b"IEND", b"")
    )


def png_header_then_junk() -> bytes:
    return png_bytes()[:33] + bytes(range(256)) * 16


def truncated_jpeg() -> bytes:
    data = jpeg_with_exif((800, 600))
    return data[: len(data) // 2]


def multipart(*parts: tuple[bytes, bytes, bytes | None], boundary: str = BOUNDARY) -> bytes:
    """A multipart body from raw (disposition params, content, content type) triples, so
    file names reach the server byte for byte (httpx would escape them)."""
    out = b""
    for params, content, content_type in parts:
        out += f"--{boundary}\r\n".encode()
        out += b"Content-Disposition: form-data; " + params + b"\r\n"
        if content_type is not None:
            out += b"Content-Type: " + content_type + b"\r\n"
        out += b"\r\n" + content + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def file_part(
    name: bytes, content: bytes, content_type: bytes | None = b"text/plain"
) -> tuple[bytes, bytes, bytes | None]:
    return b'name="file"; filename="' + name + b'"', content, content_type


def field(name: str, value: str) -> tuple[bytes, bytes, bytes | None]:
    return f'name="{name}"'.encode(), value.encode(), None


MULTIPART_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


# -- checks -------------------------------------------------------------------------------


def assert_error(response: httpx.Response, status: int, *codes: str) -> JSON:
    assert response.status_code == status, (response.request.url, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] in codes, body
    assert body["error"]["message"]
    assert "Traceback" not in response.text
    return dict(body["error"])


def temp_files(server: ServerProcess) -> list[str]:
    """Half-written blobs (`.name.xyz.tmp`) anywhere in the store."""
    return [p for p in blobs_under(server.data_dir / "storage") if p.endswith(".tmp")]


async def assert_nothing_stored(
    server: ServerProcess, owner: User, sid: str, expected_messages: int = 0
) -> None:
    assert session_blobs(server, sid) == set()
    assert temp_files(server) == []
    assert (await owner.client.list_messages(sid))["total"] == expected_messages


async def assert_still_works(server: ServerProcess, tokens: TokenCodec) -> None:
    """Two fresh users: an upload reaches the other's socket, and a WS message comes back."""
    alice, bob = new_user("after-a"), new_user("after-b")
    async with httpx.AsyncClient(
        base_url=server.base_url, headers=bearer(tokens.issue(alice)), timeout=10
    ) as http:
        created = await http.post(
            f"{API}/sessions", json={"title": "still alive", "participants": [bob]}
        )
        assert created.status_code == 201, created.text
        sid = created.json()["session_id"]
        ws = await connected(server, sid, tokens.issue(bob))
        try:
            sent = await upload(http, {}, sid, "ok.png", png_bytes((8, 8)))
            assert sent.status_code == 201, sent.text
            frame = await next_message(ws)
            assert frame["metadata"]["file_info"]["file_id"] == sent.json()["file_id"]
            got = await http.get(sent.json()["file_url"], headers=bearer(tokens.issue(bob)))
            assert got.status_code == 200 and got.content == png_bytes((8, 8))
            await ws.send(json.dumps({"type": "message", "content": "alive", "client_msg_id": "a"}))
            echo = await next_message(ws)
            assert echo["content"] == "alive" and echo["sender_id"] == bob
        finally:
            await ws.close()


async def assert_socket_alive(ws: ClientConnection) -> None:
    await frames_until_pong(ws)


@pytest.fixture
async def room(
    server: ServerProcess, users: Users
) -> AsyncIterator[tuple[User, User, str, ClientConnection]]:
    """alice and bob in a session, bob's socket open."""
    alice, bob, sid = await new_room(users, "hostile")
    ws = await connected(server, sid, bob.token)
    yield alice, bob, sid, ws
    await ws.close()


# -- content that is not what it claims ----------------------------------------------------

REFUSED = [
    ("elf-as-png", "evil.png", ELF, "image/png", 415, "UNSUPPORTED_FILE_TYPE"),
    ("exe-as-png", "setup.png", PE, "image/png", 415, "UNSUPPORTED_FILE_TYPE"),
    ("exe-undeclared", "setup.exe", PE, None, 415, "UNSUPPORTED_FILE_TYPE"),
    ("zip-as-pdf", "report.pdf", ZIP, "application/pdf", 415, "UNSUPPORTED_FILE_TYPE"),
    ("html-as-png", "cute.png", HTML, "image/png", 415, "FILE_TYPE_MISMATCH"),
    ("js-as-jpeg", "cute.jpg", JS, "image/jpeg", 415, "FILE_TYPE_MISMATCH"),
    ("text-as-pdf", "doc.pdf", b"just words\n", "application/pdf", 415, "FILE_TYPE_MISMATCH"),
    ("png-as-jpeg", "photo.jpg", png_bytes(), "image/jpeg", 415, "FILE_TYPE_MISMATCH"),
    ("png-head-junk", "broken.png", png_header_then_junk(), "image/png", 422, "INVALID_IMAGE"),
    ("truncated-jpeg", "half.jpg", truncated_jpeg(), "image/jpeg", 422, "INVALID_IMAGE"),
    ("empty", "empty.txt", b"", "text/plain", 422, "EMPTY_FILE"),
    ("lying-header", "huge.png", lying_png(), "image/png", 422, "IMAGE_TOO_LARGE"),
]


@pytest.mark.parametrize(
    ("name", "data", "declared", "status", "code"),
    [case[1:] for case in REFUSED],
    ids=[case[0] for case in REFUSED],
)
async def test_content_is_judged_by_its_bytes(
    http: httpx.AsyncClient,
    server: ServerProcess,
    tokens: TokenCodec,
    room: tuple[User, User, str, ClientConnection],
    name: str,
    data: bytes,
    declared: str | None,
    status: int,
    code: str,
) -> None:
    alice, _, sid, bob_ws = room
    response = await upload(http, alice.headers, sid, name, data, declared, message="look")
    assert_error(response, status, code)
    await assert_nothing_stored(server, alice, sid)
    assert await pending_messages(bob_ws) == []
    await assert_still_works(server, tokens)


async def test_decompression_bomb_is_refused_quickly(
    http: httpx.AsyncClient,
    server: ServerProcess,
    tokens: TokenCodec,
    room: tuple[User, User, str, ClientConnection],
) -> None:
    alice, _, sid, bob_ws = room
    # 400 Mpixels (past Pillow's own hard limit) and 64 Mpixels (past MAX_IMAGE_PIXELS,
    # 40 M, but a picture Pillow would happily decode into 64 MB).
    for side in (20_000, 8_000):
        data = bomb_png(side)
        assert len(data) < 100_000  # small on the wire ...
        assert struct.unpack(">II", data[16:24]) == (side, side)  # ... huge when decoded
        if side == 8_000:
            assert Image.open(io.BytesIO(data)).size == (side, side)
        started = time.monotonic()
        response = await upload(http, alice.headers, sid, "bomb.png", data, "image/png")
        assert_error(response, 422, "IMAGE_TOO_LARGE")
        assert time.monotonic() - started < 5, "the bomb was decoded instead of refused"
    await assert_nothing_stored(server, alice, sid)
    await assert_socket_alive(bob_ws)
    await assert_still_works(server, tokens)


async def test_active_content_is_kept_as_inert_text(
    http: httpx.AsyncClient, room: tuple[User, User, str, ClientConnection]
) -> None:
    """HTML, SVG and scripts declared as what they are sniff as text and are served as
    plain-text attachments that no browser renders or runs."""
    alice, bob, sid, _ = room
    for name, data, declared in [
        ("page.html", HTML, "text/html"),
        ("logo.svg", SVG, "image/svg+xml"),
        ("app.js", JS, "application/javascript"),
    ]:
        body = (await upload(http, alice.headers, sid, name, data, declared)).json()
        assert body["file_info"]["type"] == "text/plain", (name, body)
        assert body["thumbnail_url"] is None
        got = await http.get(body["file_url"], headers=bob.headers)
        assert got.content == data
        assert got.headers["content-type"] == "text/plain; charset=utf-8"
        assert got.headers["content-disposition"].startswith("attachment;")
        assert got.headers["x-content-type-options"] == "nosniff"
        assert got.headers["content-security-policy"] == "default-src 'none'; sandbox"


# -- malformed requests --------------------------------------------------------------------


async def test_malformed_multipart(
    http: httpx.AsyncClient,
    server: ServerProcess,
    tokens: TokenCodec,
    room: tuple[User, User, str, ClientConnection],
) -> None:
    alice, _, sid, bob_ws = room
    url = f"{API}/sessions/{sid}/files"
    two_files = multipart(file_part(b"a.txt", b"one"), file_part(b"b.txt", b"two"))
    other_name = multipart((b'name="attachment"; filename="a.txt"', b"x", b"text/plain"))
    cases: list[tuple[str, bytes, str, int, str]] = [
        ("two files", two_files, MULTIPART_TYPE, 400, "BAD_REQUEST"),
        ("no file part", multipart(field("message", "hi")), MULTIPART_TYPE, 422, "FILE_REQUIRED"),
        (
            "file as a text field",
            multipart(field("file", "hello")),
            MULTIPART_TYPE,
            422,
            "FILE_REQUIRED",
        ),
        ("file under another name", other_name, MULTIPART_TYPE, 422, "FILE_REQUIRED"),
        ("empty form", f"--{BOUNDARY}--\r\n".encode(), MULTIPART_TYPE, 422, "FILE_REQUIRED"),
        ("no boundary", two_files, "multipart/form-data", 400, "BAD_REQUEST"),
        ("wrong boundary", two_files, "multipart/form-data; boundary=other", 400, "BAD_REQUEST"),
        ("garbage", b"\x00\xff garbage \r\n--x", MULTIPART_TYPE, 400, "BAD_REQUEST"),
        (
            "part without name",
            multipart((b'filename="a.txt"', b"x", b"text/plain")),
            MULTIPART_TYPE,
            400,
            "BAD_REQUEST",
        ),
        (
            "caption over 16 KiB",
            multipart(file_part(b"a.txt", b"x"), field("message", "m" * 17_000)),
            MULTIPART_TYPE,
            400,
            "BAD_REQUEST",
        ),
        (
            "caption over 4000 chars",
            multipart(file_part(b"a.txt", b"x"), field("message", "m" * 4001)),
            MULTIPART_TYPE,
            413,
            "CONTENT_TOO_LARGE",
        ),
        (
            "too many fields",
            multipart(file_part(b"a.txt", b"x"), *(field(f"f{i}", "v") for i in range(10))),
            MULTIPART_TYPE,
            400,
            "BAD_REQUEST",
        ),
        # Refused after the blob was written (when sending the message): undone.
        (
            "client_msg_id over 100 chars",
            multipart(file_part(b"a.txt", b"x"), field("client_msg_id", "c" * 101)),
            MULTIPART_TYPE,
            422,
            "VALIDATION_ERROR",
        ),
        ("raw bytes", png_bytes(), "application/octet-stream", 415, "EXPECTED_MULTIPART"),
        ("raw png", png_bytes(), "image/png", 415, "EXPECTED_MULTIPART"),
        ("json", b'{"file": "x"}', "application/json", 415, "EXPECTED_MULTIPART"),
        ("urlencoded", b"file=x", "application/x-www-form-urlencoded", 415, "EXPECTED_MULTIPART"),
        ("no content type", b"file", "", 415, "EXPECTED_MULTIPART"),
    ]
    for label, content, content_type, status, code in cases:
        headers = {**alice.headers, "content-type": content_type}
        response = await http.post(url, headers=headers, content=content)
        assert response.status_code == status, (label, response.text)
        assert_error(response, status, code)
    await assert_nothing_stored(server, alice, sid)
    assert await pending_messages(bob_ws) == []
    await assert_still_works(server, tokens)


async def test_truncated_multipart_stores_nothing(
    http: httpx.AsyncClient, server: ServerProcess, room: tuple[User, User, str, ClientConnection]
) -> None:
    # The multipart parser reports only the parts it saw end, so a part cut off before
    # its closing boundary is no part at all: the form "has no file".
    alice, _, sid, bob_ws = room
    body = multipart(file_part(b"a.txt", b"hello world"))
    cut = body[: body.index(b"hello") + 5]  # the client died mid-upload
    response = await http.post(
        f"{API}/sessions/{sid}/files",
        headers={**alice.headers, "content-type": MULTIPART_TYPE},
        content=cut,
    )
    assert_error(response, 422, "FILE_REQUIRED")
    await assert_nothing_stored(server, alice, sid)
    assert await pending_messages(bob_ws) == []


async def test_upload_reusing_a_text_messages_client_msg_id(
    http: httpx.AsyncClient, server: ServerProcess, users: Users
) -> None:
    alice, bob, sid = await new_room(users)
    sent = await http.post(
        f"{API}/sessions/{sid}/messages",
        headers=alice.headers,
        json={"content": "hi", "client_msg_id": "dup-1"},
    )
    assert sent.status_code == 201
    response = await upload(
        http, alice.headers, sid, "a.txt", b"hello", "text/plain", client_msg_id="dup-1"
    )
    if response.status_code == 201:
        # Whatever it answers must be usable: the file it names must download.
        got = await http.get(response.json()["file_url"], headers=bob.headers)
        assert got.status_code == 200, (response.json(), got.text)
        assert response.json()["message_id"] != sent.json()["message_id"]
    else:
        assert_error(response, 409, "CLIENT_MSG_ID_REUSED")


# -- file names ----------------------------------------------------------------------------

NAMES: list[tuple[bytes, str]] = [
    (b"../../etc/passwd", "passwd"),
    (b"..\\..\\win.ini", "win.ini"),
    (b"/etc/shadow", "shadow"),
    (b"C:\\Windows\\system.ini", "system.ini"),
    (b"a\x00b.txt", "ab.txt"),
    (b"line\nbreak.txt", "linebreak.txt"),
    (b"esc\x1b[31mred.txt", "esc[31mred.txt"),
    ("\u202etxt.exe".encode(), "txt.exe"),
    (b"CON.txt", "_CON.txt"),
    (b"..", "file"),
    (b"", "file"),
    ("한글 파일.txt".encode(), "한글 파일.txt"),
]


async def test_hostile_file_names_are_sanitised_and_stay_in_the_store(
    http: httpx.AsyncClient,
    server: ServerProcess,
    tokens: TokenCodec,
    room: tuple[User, User, str, ClientConnection],
) -> None:
    alice, bob, sid, _ = room
    url = f"{API}/sessions/{sid}/files"
    headers = {**alice.headers, "content-type": MULTIPART_TYPE}
    outside_before = {
        p for p in blobs_under(server.data_dir.parent) if not p.startswith(server.data_dir.name)
    }
    file_ids: list[str] = []
    long_ascii = ("a" * 996 + ".txt").encode()
    long_korean = ("가" * 1000 + ".txt").encode()
    for raw, expected in [*NAMES, (long_ascii, ""), (long_korean, "")]:
        response = await http.post(url, headers=headers, content=multipart(file_part(raw, b"hi")))
        assert response.status_code == 201, (raw[:40], response.text)
        body = response.json()
        name = body["file_info"]["name"]
        if expected:
            assert name == expected, raw
        else:  # the long ones: cut to 255 bytes of whole characters, extension kept
            assert len(name.encode()) <= 255 and name.endswith(".txt"), name
            assert set(name.removesuffix(".txt")) == {raw.decode()[0]}, name
        assert not any(ch in name for ch in "/\\\x00\n\r")
        got = await http.get(body["file_url"], headers=bob.headers)
        assert got.status_code == 200 and got.content == b"hi"
        disposition = got.headers["content-disposition"]
        assert disposition.isascii() and "\r" not in disposition and "\n" not in disposition
        assert disposition.startswith('attachment; filename="')
        file_ids.append(body["file_id"])
    # Stored under ids, never under the names: nothing appeared outside storage/files/{sid}.
    assert session_blobs(server, sid) == set(file_ids)
    outside_after = {
        p for p in blobs_under(server.data_dir.parent) if not p.startswith(server.data_dir.name)
    }
    assert outside_after == outside_before
    for path in blobs_under(server.data_dir):
        assert not path.endswith(("passwd", "shadow", "win.ini", "system.ini")), path
    await assert_still_works(server, tokens)


# -- WebSocket `file` frames ---------------------------------------------------------------


async def test_ws_file_frame_for_someone_elses_upload_is_refused(
    http: httpx.AsyncClient,
    server: ServerProcess,
    tokens: TokenCodec,
    room: tuple[User, User, str, ClientConnection],
) -> None:
    alice, bob, sid, bob_ws = room
    body = (await upload(http, alice.headers, sid, "draft.png", png_bytes(), attach="false")).json()
    file_id = body["file_id"]
    for frame, code in [
        (
            {"type": "file", "file_id": file_id, "message": "mine now", "client_msg_id": "s-1"},
            "FILE_NOT_ATTACHABLE",
        ),
        (
            {"type": "file", "file_id": "file_doesnotexist", "client_msg_id": "s-2"},
            "FILE_NOT_FOUND",
        ),
        ({"type": "file", "client_msg_id": "s-3"}, "VALIDATION_ERROR"),
        ({"type": "file", "file_id": 42, "client_msg_id": "s-4"}, "VALIDATION_ERROR"),
        ({"type": "file", "file_id": "x" * 101, "client_msg_id": "s-5"}, "VALIDATION_ERROR"),
    ]:
        await bob_ws.send(json.dumps(frame))
        error = await recv_until(bob_ws, "error")
        assert error["code"] == code, (frame, error)
        assert error["client_msg_id"] == frame["client_msg_id"]
    # The socket is still usable, nothing was sent, bob still cannot fetch the draft ...
    assert await pending_messages(bob_ws) == []
    assert (await http.get(body["file_url"], headers=bob.headers)).status_code == 404
    await bob_ws.send(json.dumps({"type": "message", "content": "bob here"}))
    assert (await next_message(bob_ws))["content"] == "bob here"
    # Nor can its uploader send it into another session of theirs ...
    elsewhere = (await alice.client.create_session(title="elsewhere"))["session_id"]
    other_ws = await connected(server, elsewhere, alice.token)
    try:
        await other_ws.send(json.dumps({"type": "file", "file_id": file_id}))
        assert (await recv_until(other_ws, "error"))["code"] == "FILE_NOT_FOUND"
    finally:
        await other_ws.close()
    assert (await alice.client.list_messages(elsewhere))["total"] == 0
    # ... but here it still can.
    alice_ws = await connected(server, sid, alice.token)
    try:
        await alice_ws.send(json.dumps({"type": "file", "file_id": file_id}))
        frame = await next_message(bob_ws)
        assert frame["metadata"]["file_info"]["file_id"] == file_id
        assert frame["content"] == ""
    finally:
        await alice_ws.close()
    await assert_still_works(server, tokens)


# -- strangers and anonymous callers -------------------------------------------------------


@pytest.fixture
async def target(http: httpx.AsyncClient, users: Users) -> tuple[User, User, str, JSON, JSON]:
    """alice and bob's session with a sent photo and an unsent draft of alice's."""
    alice, bob, sid = await new_room(users, "private")
    photo = (await upload(http, alice.headers, sid, "private.png", png_bytes())).json()
    draft = (
        await upload(http, alice.headers, sid, "draft.jpg", jpeg_with_exif(), attach="false")
    ).json()
    await alice.client.send_message(sid, "secret text")
    return alice, bob, sid, photo, draft


def leaks(response: httpx.Response) -> bool:
    """Whether a response carries image bytes or the conversation."""
    content = response.content
    return (
        content.startswith((b"\x89PNG", b"\xff\xd8"))
        or b"\x89PNG" in content
        or b"JFIF" in content
        or b"secret text" in content
    )


async def test_a_non_participant_gets_nothing_anywhere(
    http: httpx.AsyncClient,
    server: ServerProcess,
    tokens: TokenCodec,
    users: Users,
    target: tuple[User, User, str, JSON, JSON],
) -> None:
    alice, bob, sid, photo, draft = target
    mallory = users("mallory")
    before = session_blobs(server, sid)
    mid = photo["message_id"]
    requests: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", photo["file_url"], {}),
        ("GET", photo["thumbnail_url"], {}),
        ("GET", photo["file_url"], {"headers": {"Range": "bytes=0-10"}}),
        ("GET", draft["file_url"], {}),
        ("GET", draft["thumbnail_url"], {}),
        ("GET", f"{API}/sessions/{sid}/transcript", {}),
        ("GET", f"{API}/sessions/{sid}/transcript?format=json", {}),
        ("GET", f"{API}/sessions/{sid}/archive", {}),
        ("GET", f"{API}/sessions/{sid}/archive?format=json", {}),
        ("GET", f"{API}/sessions/{sid}/messages", {}),
        ("PATCH", f"{API}/messages/{mid}", {"json": {"content": "defaced"}}),
        ("DELETE", f"{API}/messages/{mid}", {}),
        ("POST", f"{API}/sessions/{sid}/files", {"files": {"file": ("m.png", png_bytes())}}),
    ]
    for method, url, extra in requests:
        headers = {**mallory.headers, **extra.pop("headers", {})}
        response = await http.request(method, url, headers=headers, **extra)
        assert response.status_code in (403, 404), (method, url, response.status_code)
        assert_error(response, response.status_code, "FORBIDDEN", "FILE_NOT_FOUND")
        assert not leaks(response), (method, url)
    # Nothing changed for the participants.
    assert session_blobs(server, sid) == before
    page = await bob.client.list_messages(sid)
    assert [m["message_type"] for m in page["messages"]] == ["file", "text"]
    assert page["messages"][0]["content"] == ""
    assert (await http.get(photo["file_url"], headers=bob.headers)).content == png_bytes()

    # Their socket to the session is refused; in a session of their own, a `file` frame
    # naming alice's files (sent or draft) finds nothing.
    ws = await ws_connect(server, sid, mallory.token)
    assert await close_code(ws) == 4403
    own = (await mallory.client.create_session(title="mine"))["session_id"]
    ws = await connected(server, own, mallory.token)
    try:
        for fid in (photo["file_id"], draft["file_id"]):
            await ws.send(json.dumps({"type": "file", "file_id": fid, "client_msg_id": fid}))
            error = await recv_until(ws, "error")
            assert error["code"] == "FILE_NOT_FOUND", error
        assert await pending_messages(ws) == []
    finally:
        await ws.close()
    assert (await mallory.client.list_messages(own))["total"] == 0
    assert session_blobs(server, own) == set()
    # The draft is still alice's to send.
    alice_ws = await connected(server, sid, alice.token)
    try:
        await alice_ws.send(json.dumps({"type": "file", "file_id": draft["file_id"]}))
        assert (await next_message(alice_ws))["metadata"]["file_info"]["name"] == "draft.jpg"
    finally:
        await alice_ws.close()
    await assert_still_works(server, tokens)


async def test_a_removed_member_loses_access_to_files(
    http: httpx.AsyncClient, users: Users
) -> None:
    alice, bob = users("alice"), users("bob")
    sid = (await alice.client.create_session(title="group", participants=[bob.id]))["session_id"]
    photo = (await upload(http, alice.headers, sid, "p.png", png_bytes())).json()
    assert (await http.get(photo["file_url"], headers=bob.headers)).status_code == 200
    await alice.client.remove_participant(sid, bob.id)
    for url in (photo["file_url"], photo["thumbnail_url"]):
        response = await http.get(url, headers=bob.headers)
        assert_error(response, 403, "FORBIDDEN")
        assert not leaks(response)


async def test_unknown_deleted_and_ended_sessions(
    http: httpx.AsyncClient, server: ServerProcess, users: Users
) -> None:
    alice, bob, sid = await new_room(users)
    photo = (await upload(http, alice.headers, sid, "p.png", png_bytes())).json()
    assert_error(
        await upload(http, alice.headers, "sess_doesnotexist", "a.txt", b"x"),
        404,
        "SESSION_NOT_FOUND",
    )
    for url in ("/files/file_doesnotexist", "/files/file_doesnotexist/thumb"):
        assert_error(await http.get(url, headers=alice.headers), 404, "FILE_NOT_FOUND")
    draft = (await upload(http, alice.headers, sid, "d.txt", b"draft", attach="false")).json()

    ended = await http.post(f"{API}/sessions/{sid}/end", headers=alice.headers)
    assert ended.status_code == 200, ended.text
    before = session_blobs(server, sid)
    assert_error(await upload(http, alice.headers, sid, "late.txt", b"late"), 409, "SESSION_CLOSED")
    mid = photo["message_id"]
    assert_error(
        await http.patch(f"{API}/messages/{mid}", headers=alice.headers, json={"content": "x"}),
        409,
        "SESSION_CLOSED",
    )
    assert_error(
        await http.delete(f"{API}/messages/{mid}", headers=alice.headers), 409, "SESSION_CLOSED"
    )
    ws = await connected(server, sid, alice.token)
    try:
        await ws.send(json.dumps({"type": "file", "file_id": draft["file_id"]}))
        assert (await recv_until(ws, "error"))["code"] == "SESSION_CLOSED"
    finally:
        await ws.close()
    assert session_blobs(server, sid) == before
    # Files of an ended session stay readable to its participants.
    assert (await http.get(photo["file_url"], headers=bob.headers)).content == png_bytes()

    # A deleted session takes its files with it (for everyone).
    other, _, sid2 = await new_room(users)
    kept = (await upload(http, other.headers, sid2, "k.png", png_bytes())).json()
    assert (await http.delete(f"{API}/sessions/{sid2}", headers=other.headers)).status_code == 200
    for url in (kept["file_url"], kept["thumbnail_url"]):
        response = await http.get(url, headers=other.headers)
        assert response.status_code == 404, (url, response.text)
        assert not leaks(response)


async def test_every_path_needs_a_valid_token(
    http: httpx.AsyncClient,
    server: ServerProcess,
    tokens: TokenCodec,
    target: tuple[User, User, str, JSON, JSON],
) -> None:
    alice, _, sid, photo, _ = target
    expired = tokens.issue(alice.id, ttl_seconds=-10)
    forged = TokenCodec("not-the-server-secret-but-long-enough-for-hs256").issue(alice.id)
    mid = photo["message_id"]
    before = session_blobs(server, sid)
    paths: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", f"{API}/sessions/{sid}/files", {"files": {"file": ("a.png", png_bytes())}}),
        ("GET", photo["file_url"], {}),
        ("GET", photo["thumbnail_url"], {}),
        ("GET", f"{API}/sessions/{sid}/transcript", {}),
        ("GET", f"{API}/sessions/{sid}/archive", {}),
        ("PATCH", f"{API}/messages/{mid}", {"json": {"content": "x"}}),
        ("DELETE", f"{API}/messages/{mid}", {}),
        ("POST", f"{API}/sessions/{sid}/end", {}),
    ]
    refusals = [
        {},
        {"Authorization": "Bearer"},
        bearer("garbage"),
        bearer(expired),
        bearer(forged),
        {"Authorization": f"Basic {alice.token}"},
    ]
    for headers in refusals:
        for method, url, extra in paths:
            response = await http.request(method, url, headers=headers, **extra)
            assert_error(response, 401, "UNAUTHORIZED")
            assert response.headers.get("www-authenticate") == "Bearer"
            assert not leaks(response), (method, url)
    ws = await ws_connect(server, sid, forged)
    assert await close_code(ws) == 4401
    page = await alice.client.list_messages(sid)
    assert page["total"] == 2 and page["messages"][0]["content"] == ""
    assert session_blobs(server, sid) == before
    await assert_still_works(server, tokens)


# -- size and rate limits, on a server of their own ----------------------------------------


@pytest.fixture(scope="module")
def tight_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """MAX_FILE_SIZE 64 KiB and three sends a minute per user."""
    proc = start_server(
        tmp_path_factory.mktemp("server-tight"),
        MAX_FILE_SIZE=SMALL_MAX_FILE,
        RATE_LIMIT_ENABLED="true",
        RATE_LIMIT_MESSAGES_PER_MINUTE=PER_MINUTE,
    )
    yield proc
    proc.stop()


@pytest.fixture
async def tight(tight_server: ServerProcess, tokens: TokenCodec) -> AsyncIterator[Users]:
    made = Users(tight_server, tokens)
    yield made
    await made.aclose()


@pytest.fixture
async def tight_http(tight_server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=tight_server.base_url, timeout=30) as client:
        yield client


def raw_request(port: int, head: str, body: bytes = b"", timeout: float = 5.0) -> bytes:
    """Send a request head (and maybe part of a body) on a raw socket and read what comes
    back until the response is complete, the server closes, or `timeout` passes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.encode() + body)
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            data += chunk
            head_part, sep, rest = data.partition(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head_part)
            if sep and length and len(rest) >= int(length.group(1)):
                break
        return data


def upload_head(sid: str, token: str | None, length: int | None) -> str:
    lines = [
        f"POST {API}/sessions/{sid}/files HTTP/1.1",
        "Host: 127.0.0.1",
        f"Content-Type: {MULTIPART_TYPE}",
    ]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    if length is None:
        lines.append("Transfer-Encoding: chunked")
    else:
        lines.append(f"Content-Length: {length}")
    return "\r\n".join(lines) + "\r\n\r\n"


def status_of(raw: bytes) -> int:
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", raw)
    assert match, raw[:200]
    return int(match.group(1))


async def test_over_size_with_content_length(
    tight_http: httpx.AsyncClient,
    tight_server: ServerProcess,
    tight: Users,
    tokens: TokenCodec,
) -> None:
    alice = tight("alice")
    sid = (await alice.client.create_session(title="big"))["session_id"]
    # Over the body limit: refused from the declared length.
    response = await upload(
        tight_http, alice.headers, sid, "big.txt", b"x" * (SMALL_MAX_FILE + MULTIPART_OVERHEAD)
    )
    assert_error(response, 413, "CONTENT_TOO_LARGE")
    # Inside the multipart allowance but over MAX_FILE_SIZE: refused after parsing.
    response = await upload(tight_http, alice.headers, sid, "big.txt", b"x" * (SMALL_MAX_FILE + 1))
    assert_error(response, 413, "CONTENT_TOO_LARGE")
    assert session_blobs(tight_server, sid) == set() and temp_files(tight_server) == []
    # A 10 GB declaration is refused at once, before a byte of it is sent.
    started = time.monotonic()
    raw = await asyncio.to_thread(
        raw_request, tight_server.port, upload_head(sid, alice.token, 10_000_000_000)
    )
    assert status_of(raw) == 413 and b"CONTENT_TOO_LARGE" in raw
    assert time.monotonic() - started < 3
    # Exactly MAX_FILE_SIZE is fine (and is the second send of alice's budget of three).
    response = await upload(tight_http, alice.headers, sid, "max.txt", b"y" * SMALL_MAX_FILE)
    assert response.status_code == 201, response.text
    assert response.json()["file_info"]["size"] == SMALL_MAX_FILE
    await assert_still_works(tight_server, tokens)


async def test_over_size_chunked_body(
    tight_http: httpx.AsyncClient,
    tight_server: ServerProcess,
    tight: Users,
    tokens: TokenCodec,
) -> None:
    """A chunked body declares no length: the limit holds while it streams.

    Either outcome is acceptable for the client that writes its whole body before reading
    (as httpx does): a clean 413, or a connection the server closed after its 413. What it
    sees today (a finding): the 413 goes out as soon as the limit is passed, but the
    connection stays open and the server reads and drops the rest of the body, so the
    client gets its clean 413 only after sending all 4 MiB.
    """
    alice = tight("alice")
    sid = (await alice.client.create_session(title="chunked"))["session_id"]
    sent = 0
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="s.txt"\r\n\r\n'

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        yield head.encode()
        for _ in range(64):  # 4 MiB, 32x the limit
            sent += 65536
            yield b"z" * 65536

    try:
        response = await tight_http.post(
            f"{API}/sessions/{sid}/files",
            headers={**alice.headers, "content-type": MULTIPART_TYPE},
            content=body(),
        )
    except (httpx.WriteError, httpx.ReadError, httpx.RemoteProtocolError):
        # The server hung up on a client still sending: fine, as long as it stored nothing.
        assert sent < 4 * 1024 * 1024
    else:
        assert_error(response, 413, "CONTENT_TOO_LARGE")
    assert session_blobs(tight_server, sid) == set() and temp_files(tight_server) == []

    # On a raw socket the 413 arrives while the body is still coming: the refusal does not
    # wait for the end of the body.
    def stream_until_answered() -> tuple[bytes, int]:
        with socket.create_connection(("127.0.0.1", tight_server.port), timeout=5) as sock:
            sock.sendall(upload_head(sid, alice.token, None).encode())
            piece = b"z" * 16384
            sock.sendall(b"%x\r\n%s\r\n" % (len(head), head.encode()))
            written = 0
            sock.settimeout(0.05)
            answer = b""
            while written < 4 * 1024 * 1024 and b"\r\n\r\n" not in answer:
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                written += len(piece)
                try:
                    answer += sock.recv(65536)
                except TimeoutError:
                    pass
            return answer, written

    answer, written = await asyncio.to_thread(stream_until_answered)
    assert status_of(answer) == 413, answer[:200]
    assert written < 1024 * 1024, f"the 413 came only after {written} bytes"
    await assert_still_works(tight_server, tokens)


async def test_uploads_are_rate_limited_as_one_send_each(
    tight_http: httpx.AsyncClient,
    tight_server: ServerProcess,
    tight: Users,
    tokens: TokenCodec,
) -> None:
    alice, bob = tight("alice"), tight("bob")
    sid = (await alice.client.create_session(title="rate", participants=[bob.id]))["session_id"]
    for i in range(PER_MINUTE):  # an upload and its message are one send, not two
        response = await upload(tight_http, alice.headers, sid, f"{i}.png", png_bytes())
        assert response.status_code == 201, (i, response.text)
    refused = await upload(tight_http, alice.headers, sid, "over.png", png_bytes())
    error = assert_error(refused, 429, "RATE_LIMIT")
    retry_after = int(refused.headers["retry-after"])
    assert 1 <= retry_after <= 60
    assert 0 < error["retry_after"] <= 60_000
    assert len(session_blobs(tight_server, sid)) == 2 * PER_MINUTE
    # Refused before its body is read: the answer comes with most of the body unsent.
    raw = await asyncio.to_thread(
        raw_request, tight_server.port, upload_head(sid, alice.token, 100_000), b"--x"
    )
    assert status_of(raw) == 429 and re.search(rb"(?im)^retry-after: \d+", raw)
    assert (await alice.client.list_messages(sid))["total"] == PER_MINUTE
    assert temp_files(tight_server) == []

    # A `file` frame is a send too; bob's budget is his own.
    drafts = [
        (await upload(tight_http, bob.headers, sid, f"d{i}.txt", b"d", attach="false")).json()
        for i in range(2)
    ]
    assert all("file_id" in d for d in drafts), drafts
    ws = await ws_connect(tight_server, sid, bob.token)
    try:
        await ws.send(json.dumps({"type": "file", "file_id": drafts[0]["file_id"]}))
        assert (await recv_until(ws, "message"))["metadata"]["file_info"]["name"] == "d0.txt"
        await ws.send(
            json.dumps({"type": "file", "file_id": drafts[1]["file_id"], "client_msg_id": "r"})
        )
        error_frame = await recv_until(ws, "error")
        assert error_frame["code"] == "RATE_LIMIT" and error_frame["retry_after"] > 0
        await frames_until_pong(ws)  # the socket survives
    finally:
        await ws.close()
    await assert_still_works(tight_server, tokens)
