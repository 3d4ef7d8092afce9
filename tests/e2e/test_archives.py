"""Transcripts, archives and the background jobs, end to end.

- On the shared server (SQLite and PostgreSQL): the transcript's exact text layout with
  `name` claims and Korean, the JSON form, ending (the archive files on disk, served back,
  idempotent), and 404s before the end and for empty sessions.
- On a server with one-second jobs: snapshots of live sessions (kept to the newest three,
  removed by the end) and idle sessions ended and archived.
- On S3 (moto): the whole flow, checked in the bucket; an unreachable S3 refuses to start.
- Two instances on Redis, one PostgreSQL and one bucket: files cross instances and the
  snapshot job runs on one instance per interval.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import pytest

from chatservice.auth import TokenCodec
from chatservice.store.migrate import upgrade
from tests.conftest import (
    POSTGRES_ADMIN_URL,
    TEST_SECRET,
    ServerProcess,
    _create_database,
    _drop_database,
    _with_database,
    free_port,
    new_user,
    start_server,
)
from tests.e2e.conftest import bearer, recv_until
from tests.e2e.scaleout_helpers import Cluster, eventually, start_cluster
from tests.e2e.test_files import (
    API,
    JSON,
    blobs_under,
    connected,
    jpeg_with_exif,
    next_message,
    pdf_bytes,
    png_bytes,
    upload,
)
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
STAMP = re.compile(r"_snapshot_(\d{14})\.txt$")


def s3_env(endpoint: str, bucket: str) -> dict[str, str]:
    return {
        "FILE_STORAGE_TYPE": "s3",
        "S3_BUCKET_NAME": bucket,
        "S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET_ACCESS_KEY,
        "AWS_DEFAULT_REGION": S3_REGION,
    }


# -- an unreachable S3, started in the background while the other tests run ------------------


@pytest.fixture(scope="module", autouse=True)
def unreachable_s3_start(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """`serve` against an S3 endpoint on a closed port. botocore retries for a while before
    giving up, so the process runs alongside this module's other tests; the last test of the
    module collects what it said."""
    data_dir = tmp_path_factory.mktemp("server-s3-unreachable")
    out = data_dir / "serve.out"
    env = {
        **os.environ,
        "DATA_DIR": str(data_dir),
        "JWT_SECRET_KEY": TEST_SECRET,
        **s3_env(f"http://127.0.0.1:{free_port()}", new_bucket_name()),
    }
    with out.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "chatservice.cli", "serve", "--port", str(free_port())],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )
    yield process, out
    if process.poll() is None:
        process.kill()
        process.wait(5)


# -- helpers ------------------------------------------------------------------------------


def archive_dir(server: ServerProcess) -> Path:
    return server.data_dir / "storage" / "archive"


def snapshots_on_disk(server: ServerProcess, sid: str) -> list[str]:
    temp = server.data_dir / "storage" / "temp"
    return sorted(p for p in blobs_under(temp) if p.startswith(f"chat_{sid}_snapshot_"))


def local_time(iso: str) -> str:
    """A message's `created_at` as a transcript shows it (TRANSCRIPT_TIMEZONE=UTC)."""
    moment = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def block(message: JSON, name: str, content: str) -> str:
    return (
        f"[{local_time(message['created_at'])}]\n"
        f"From: {name} ({message['sender_id']})\n"
        f"Content: {content}\n"
        f"{SEPARATOR}\n"
    )


def expected_transcript(sid: str, title: str, generated: str, blocks: list[str]) -> str:
    return (
        f"{RULE}\n       Chat transcript\n{RULE}\n\n"
        f"Session: {sid} ({title})\n"
        f"Generated at: {generated}\n"
        f"Total messages: {len(blocks)}\n"
        f"\n{RULE}\n\n" + "".join(blocks) + f"\n{RULE}\nEnd of transcript\n{RULE}\n"
    )


def generated_at(text: str) -> str:
    match = re.search(r"^Generated at: (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)$", text, re.M)
    assert match, text[:400]
    moment = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    assert abs(datetime.now(UTC) - moment) < timedelta(seconds=30), match.group(1)
    return match.group(1)


class Named:
    """A user with a `name` claim in their token (the SDK fixture issues none)."""

    def __init__(self, tokens: TokenCodec, prefix: str, name: str | None) -> None:
        self.id = new_user(prefix)
        self.name = name
        self.token = tokens.issue(self.id, name=name)
        self.headers = bearer(self.token)


async def create(http: httpx.AsyncClient, owner: Any, title: str, *others: Any) -> str:
    response = await http.post(
        f"{API}/sessions",
        headers=owner.headers,
        json={"title": title, "participants": [o.id for o in others]},
    )
    assert response.status_code == 201, response.text
    return str(response.json()["session_id"])


async def say(http: httpx.AsyncClient, user: Any, sid: str, content: str) -> JSON:
    response = await http.post(
        f"{API}/sessions/{sid}/messages", headers=user.headers, json={"content": content}
    )
    assert response.status_code == 201, response.text
    body: JSON = response.json()
    return body


async def history(http: httpx.AsyncClient, user: Any, sid: str) -> list[JSON]:
    page = await http.get(f"{API}/sessions/{sid}/messages?limit=200", headers=user.headers)
    assert page.status_code == 200, page.text
    messages: list[JSON] = page.json()["messages"]
    return messages


async def end(http: httpx.AsyncClient, user: Any, sid: str) -> JSON:
    response = await http.post(f"{API}/sessions/{sid}/end", headers=user.headers)
    assert response.status_code == 200, response.text
    body: JSON = response.json()
    return body


def assert_not_found(response: httpx.Response, code: str) -> None:
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == code


# -- transcripts on the shared server ------------------------------------------------------


async def test_transcript_text_layout(
    http: httpx.AsyncClient, server: ServerProcess, tokens: TokenCodec
) -> None:
    alice = Named(tokens, "alice", "김철수")
    bob = Named(tokens, "bob", None)  # no name claim: the transcript shows the id
    sid = await create(http, alice, "상담 문의", bob)

    empty = await http.get(f"{API}/sessions/{sid}/transcript", headers=bob.headers)
    assert empty.status_code == 200
    assert empty.text == "There are no messages in this chat."
    assert empty.headers["content-type"] == "text/plain; charset=utf-8"

    await say(http, alice, sid, "안녕하세요, 반품 문의드립니다.")
    await say(http, bob, sid, "네, 주문 번호를 알려주세요.\n두 줄째입니다.")
    receipt = pdf_bytes()
    sent = await upload(
        http, alice.headers, sid, "영수증.pdf", receipt, "application/pdf", message="영수증 첨부"
    )
    assert sent.status_code == 201, sent.text
    file_id = sent.json()["file_id"]
    await upload(http, bob.headers, sid, "note.txt", b"plain")  # no caption
    typo = await say(http, alice, sid, "오타")
    await http.patch(
        f"{API}/messages/{typo['message_id']}", headers=alice.headers, json={"content": "고침"}
    )
    gone = await say(http, bob, sid, "곧 지울 메시지")
    deleted = await http.delete(f"{API}/messages/{gone['message_id']}", headers=bob.headers)
    assert deleted.status_code == 200

    messages = await history(http, alice, sid)
    assert len(messages) == 5
    note_id = messages[3]["metadata"]["file_info"]["file_id"]
    response = await http.get(f"{API}/sessions/{sid}/transcript?format=text", headers=bob.headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.headers["content-disposition"] == f'inline; filename="chat-{sid}.txt"'
    text = response.text
    expected = expected_transcript(
        sid,
        "상담 문의",
        generated_at(text),
        [
            block(messages[0], "김철수", "안녕하세요, 반품 문의드립니다."),
            block(messages[1], bob.id, "네, 주문 번호를 알려주세요.\n두 줄째입니다."),
            block(
                messages[2],
                "김철수",
                f"영수증 첨부\nFile: 영수증.pdf (application/pdf, {len(receipt)} bytes) "
                f"/files/{file_id}",
            ),
            block(messages[3], bob.id, f"File: note.txt (text/plain, 5 bytes) /files/{note_id}"),
            block(messages[4], "김철수", "고침"),
        ],
    )
    assert text == expected


async def test_transcript_names_every_participant_by_their_name_claim(
    http: httpx.AsyncClient, tokens: TokenCodec
) -> None:
    alice = Named(tokens, "alice", "김철수")
    bob = Named(tokens, "bob", "Bob Lee")
    sid = await create(http, alice, "names", bob)
    await say(http, alice, sid, "hi")
    await say(http, bob, sid, "hello")
    text = (await http.get(f"{API}/sessions/{sid}/transcript", headers=alice.headers)).text
    assert f"From: 김철수 ({alice.id})" in text
    assert f"From: Bob Lee ({bob.id})" in text


async def test_transcript_json(http: httpx.AsyncClient, tokens: TokenCodec) -> None:
    alice = Named(tokens, "alice", "Alice")
    bob = Named(tokens, "bob", None)
    sid = await create(http, alice, "json", bob)
    await say(http, alice, sid, "first")
    photo = await upload(http, bob.headers, sid, "p.png", png_bytes(), message="pic")
    response = await http.get(f"{API}/sessions/{sid}/transcript?format=json", headers=bob.headers)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["content-disposition"] == f'inline; filename="chat-{sid}.json"'
    body = response.json()
    assert body["session"]["session_id"] == sid and body["session"]["title"] == "json"
    assert {(p["user_id"], p["display_name"]) for p in body["session"]["participants"]} >= {
        (alice.id, "Alice")
    }
    assert body["message_count"] == 2
    first, second = body["messages"]
    assert (first["sender_name"], first["content"], first["file"]) == ("Alice", "first", None)
    assert second["message_type"] == "file" and second["content"] == "pic"
    info = photo.json()
    assert second["file"]["file_id"] == info["file_id"]
    assert second["file"]["url"] == info["file_url"]
    assert body["files"] == [second["file"]]
    bad = await http.get(f"{API}/sessions/{sid}/transcript?format=xml", headers=bob.headers)
    assert bad.status_code == 422


# -- ending and archives on the shared server -----------------------------------------------


async def test_end_writes_the_archive_once_and_serves_it(
    http: httpx.AsyncClient, server: ServerProcess, tokens: TokenCodec
) -> None:
    alice = Named(tokens, "alice", "상담원")
    bob = Named(tokens, "bob", None)
    sid = await create(http, alice, "보관", bob)
    before = await http.get(f"{API}/sessions/{sid}/archive", headers=alice.headers)
    assert_not_found(before, "ARCHIVE_NOT_FOUND")
    await say(http, alice, sid, "마지막 메시지")
    await upload(http, bob.headers, sid, "사진.jpg", jpeg_with_exif())
    live = await http.get(f"{API}/sessions/{sid}/archive", headers=alice.headers)
    assert_not_found(live, "ARCHIVE_NOT_FOUND")

    ended = await end(http, alice, sid)
    assert ended["status"] == "archived" and ended["ended_at"].endswith("Z")
    text_key, json_key = f"archive/chat_{sid}_final.txt", f"archive/chat_{sid}_final.json"
    assert ended["archive"] == {
        "state": "done",
        "text_key": text_key,
        "json_key": json_key,
        "url": f"/api/chat/sessions/{sid}/archive",
    }
    text_file = server.data_dir / "storage" / text_key
    json_file = server.data_dir / "storage" / json_key
    on_disk = text_file.read_bytes()
    assert sorted(p for p in blobs_under(archive_dir(server)) if sid in p) == [
        f"chat_{sid}_final.json",
        f"chat_{sid}_final.txt",
    ]

    for user in (alice, bob):
        got = await http.get(ended["archive"]["url"], headers=user.headers)
        assert got.status_code == 200, got.text
        assert got.content == on_disk
        assert got.headers["content-type"] == "text/plain; charset=utf-8"
        assert got.headers["content-disposition"] == (
            f'attachment; filename="archived-chat-log-{sid}.txt"'
        )
    text = on_disk.decode()
    messages = await history(http, alice, sid)
    generated = generated_at(text)
    photo = messages[1]["metadata"]["file_info"]
    assert text == expected_transcript(
        sid,
        "보관",
        generated,
        [
            block(messages[0], "상담원", "마지막 메시지"),
            block(
                messages[1],
                bob.id,
                f"File: 사진.jpg (image/jpeg, {photo['size']} bytes) {photo['url']}",
            ),
        ],
    )
    as_json = await http.get(f"{ended['archive']['url']}?format=json", headers=bob.headers)
    assert as_json.status_code == 200
    assert as_json.content == json_file.read_bytes()
    assert as_json.headers["content-disposition"] == (
        f'attachment; filename="archived-chat-log-{sid}.json"'
    )
    parsed = as_json.json()
    assert parsed["message_count"] == 2 and parsed["session"]["status"] == "archived"
    assert [m["content"] for m in parsed["messages"]] == ["마지막 메시지", ""]

    # Ending again changes nothing: same answer, the same two files, untouched.
    stamp = text_file.stat().st_mtime_ns
    again = await end(http, alice, sid)
    assert again["archive"] == ended["archive"] and again["ended_at"] == ended["ended_at"]
    assert text_file.stat().st_mtime_ns == stamp and text_file.read_bytes() == on_disk
    assert len([p for p in blobs_under(archive_dir(server)) if sid in p]) == 2
    # The session is read-only now, and the archive does not change with it.
    refused = await http.post(
        f"{API}/sessions/{sid}/messages", headers=bob.headers, json={"content": "late"}
    )
    assert refused.status_code == 409
    assert (await http.get(ended["archive"]["url"], headers=bob.headers)).content == on_disk


async def test_an_empty_session_is_not_archived(
    http: httpx.AsyncClient, server: ServerProcess, tokens: TokenCodec
) -> None:
    alice = Named(tokens, "alice", "A")
    sid = await create(http, alice, "empty")
    ended = await end(http, alice, sid)
    assert ended["archive"] == {"state": "empty", "text_key": None, "json_key": None, "url": None}
    for fmt in ("text", "json"):
        got = await http.get(f"{API}/sessions/{sid}/archive?format={fmt}", headers=alice.headers)
        assert_not_found(got, "ARCHIVE_NOT_FOUND")
    assert [p for p in blobs_under(archive_dir(server)) if sid in p] == []
    assert (await end(http, alice, sid))["archive"]["state"] == "empty"
    unknown = await http.get(f"{API}/sessions/sess_nope/archive", headers=alice.headers)
    assert_not_found(unknown, "SESSION_NOT_FOUND")


# -- the jobs, on a server with short intervals ----------------------------------------------


@pytest.fixture(scope="module")
def jobs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = start_server(
        tmp_path_factory.mktemp("server-jobs"),
        ARCHIVE_SNAPSHOT_INTERVAL="1s",
        ARCHIVE_SNAPSHOT_KEEP=3,
        SESSION_IDLE_TIMEOUT=3,
        SESSION_IDLE_CHECK_INTERVAL=0.5,
    )
    yield proc
    proc.stop()


@pytest.fixture
async def jobs_http(jobs_server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=jobs_server.base_url, timeout=10) as client:
        yield client


async def test_snapshots_of_a_live_session(
    jobs_http: httpx.AsyncClient, jobs_server: ServerProcess, tokens: TokenCodec
) -> None:
    alice = Named(tokens, "alice", "Alice")
    sid = await create(jobs_http, alice, "snapshots")
    started = datetime.now(UTC)
    await say(jobs_http, alice, sid, "message 1")
    await eventually(
        lambda: snapshots_on_disk(jobs_server, sid), 8, "a first snapshot", interval=0.05
    )
    [first] = snapshots_on_disk(jobs_server, sid)
    stamp = STAMP.search(first)
    assert stamp, first
    taken = datetime.strptime(stamp.group(1), "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    assert started - timedelta(seconds=2) <= taken <= datetime.now(UTC)
    content = (jobs_server.data_dir / "storage" / "temp" / first).read_text()
    assert "Total messages: 1\n" in content and "Content: message 1\n" in content
    assert f"Session: {sid} (snapshots)" in content

    # Keep talking (which also keeps the session from going idle): a snapshot per interval
    # with news, the newest three kept.
    seen: list[str] = [first]
    most = 1
    count = 1
    deadline = time.monotonic() + 20
    while len(seen) < 5:
        assert time.monotonic() < deadline, f"snapshots seen: {seen}"
        count += 1
        await say(jobs_http, alice, sid, f"message {count}")
        for _ in range(5):
            await asyncio.sleep(0.1)
            now = snapshots_on_disk(jobs_server, sid)
            most = max(most, len(now))
            seen.extend(name for name in now if name not in seen)
    current = snapshots_on_disk(jobs_server, sid)
    assert set(seen[:2]).isdisjoint(current), (seen, current)  # the oldest were pruned
    assert most <= 4, f"up to {most} snapshots at once (keep=3; 4 only while pruning)"
    await eventually(
        lambda: len(snapshots_on_disk(jobs_server, sid)) == 3, 5, "exactly three snapshots"
    )
    newest = snapshots_on_disk(jobs_server, sid)[-1]
    assert newest >= max(seen)
    assert (
        "Content: message " + str(count - 1)
        in (jobs_server.data_dir / "storage" / "temp" / newest).read_text()
    )
    detail = await jobs_http.get(f"{API}/sessions/{sid}", headers=alice.headers)
    assert detail.json()["status"] == "active"  # busy sessions are not ended as idle

    # Ending supersedes the snapshots: they go, the final archive stays, and no job writes
    # another for the ended session.
    ended = await end(jobs_http, alice, sid)
    assert ended["archive"]["state"] == "done", ended
    assert snapshots_on_disk(jobs_server, sid) == []
    assert (jobs_server.data_dir / "storage" / f"archive/chat_{sid}_final.txt").exists()
    quiet_until = time.monotonic() + 1.5  # an interval and a half
    while time.monotonic() < quiet_until:
        assert snapshots_on_disk(jobs_server, sid) == [], "a snapshot of an ended session"
        await asyncio.sleep(0.1)


async def test_idle_sessions_are_ended_and_archived(
    jobs_http: httpx.AsyncClient, jobs_server: ServerProcess, tokens: TokenCodec
) -> None:
    alice = Named(tokens, "alice", "앨리스")
    bob = Named(tokens, "bob", None)
    talked = await create(jobs_http, alice, "idle", bob)
    silent = await create(jobs_http, alice, "silent", bob)
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    planned = await jobs_http.post(
        f"{API}/sessions",
        headers=alice.headers,
        json={"title": "planned", "participants": [bob.id], "scheduled_at": tomorrow},
    )
    assert planned.json()["status"] == "scheduled", planned.text
    ws = await connected(jobs_server, talked, bob.token)
    try:
        await say(jobs_http, alice, talked, "anyone there?")
        await next_message(ws)
        started = time.monotonic()
        event = await recv_until(ws, "system", timeout=12)
        while event.get("event") != "session_ended":
            event = await recv_until(ws, "system", timeout=12)
        waited = time.monotonic() - started
    finally:
        await ws.close()
    assert event["reason"] == "idle" and event["user_id"] is None, event
    assert event["session_id"] == talked
    assert waited >= 1.0, f"ended after {waited:.2f}s, before SESSION_IDLE_TIMEOUT"

    detail = await jobs_http.get(f"{API}/sessions/{talked}", headers=bob.headers)
    assert detail.json()["status"] == "archived" and detail.json()["ended_at"]
    # `session_ended` is announced before the archive is written, so a client reacting to
    # it may briefly get ARCHIVE_NOT_FOUND ("still being written"): poll.
    archived = await jobs_http.get(f"{API}/sessions/{talked}/archive", headers=bob.headers)

    async def archive_ready() -> bool:
        nonlocal archived
        archived = await jobs_http.get(f"{API}/sessions/{talked}/archive", headers=bob.headers)
        return archived.status_code == 200

    await eventually(archive_ready, 5, "the idle session's archive")
    assert "From: 앨리스 (" in archived.text and "Content: anyone there?\n" in archived.text
    await eventually(lambda: snapshots_on_disk(jobs_server, talked) == [], 3, "snapshots removed")
    refused = await jobs_http.post(
        f"{API}/sessions/{talked}/messages", headers=bob.headers, json={"content": "hello?"}
    )
    assert refused.status_code == 409

    # A session that never had a message is ended too, with nothing to archive.
    async def silent_ended() -> bool:
        got = await jobs_http.get(f"{API}/sessions/{silent}", headers=alice.headers)
        return bool(got.json()["status"] == "archived")

    await eventually(silent_ended, 10, "the silent session ended")
    # A session scheduled for tomorrow is not idle, though created as long ago.
    later = await jobs_http.get(
        f"{API}/sessions/{planned.json()['session_id']}", headers=alice.headers
    )
    assert later.json()["status"] == "scheduled", later.json()
    assert (await end(jobs_http, alice, silent))["archive"]["state"] == "empty"
    assert_not_found(
        await jobs_http.get(f"{API}/sessions/{silent}/archive", headers=alice.headers),
        "ARCHIVE_NOT_FOUND",
    )


async def test_no_snapshot_outlives_the_end_of_its_session(
    jobs_http: httpx.AsyncClient, jobs_server: ServerProcess, tokens: TokenCodec
) -> None:
    alice = Named(tokens, "alice", "Alice")
    sids = list(await asyncio.gather(*(create(jobs_http, alice, f"race {i}") for i in range(30))))
    # Right after a run of the job, give all of them news at once, so that its next run
    # lists them all; end them while that run is busy writing their snapshots.
    warm = await create(jobs_http, alice, "warm-up")
    await say(jobs_http, alice, warm, "tick")
    await eventually(lambda: bool(snapshots_on_disk(jobs_server, warm)), 5, "a run of the job")
    await asyncio.gather(*(say(jobs_http, alice, sid, "news") for sid in sids))
    await eventually(
        lambda: any(snapshots_on_disk(jobs_server, sid) for sid in sids),
        5,
        "the snapshot job at work",
        interval=0.01,
    )
    ended = await asyncio.gather(*(end(jobs_http, alice, sid) for sid in reversed(sids)))
    assert {e["archive"]["state"] for e in ended} == {"done"}
    # Give the job's run time to finish; an absence cannot be polled for.
    await asyncio.sleep(1.5)
    left = {sid: snapshots_on_disk(jobs_server, sid) for sid in sids}
    orphans = {sid: names for sid, names in left.items() if names}
    assert orphans == {}, f"{len(orphans)} of {len(sids)} ended sessions kept a snapshot"


# -- S3 ------------------------------------------------------------------------------------


async def bucket_keys(endpoint: str, bucket: str, prefix: str = "") -> list[str]:
    async with s3_client(endpoint) as s3:
        listing = await s3.list_objects_v2(Bucket=bucket, Prefix=prefix)
        return sorted(item["Key"] for item in listing.get("Contents", []))


async def bucket_object(endpoint: str, bucket: str, key: str) -> tuple[bytes, str]:
    async with s3_client(endpoint) as s3:
        obj = await s3.get_object(Bucket=bucket, Key=key)
        async with obj["Body"] as stream:
            return await stream.read(), str(obj["ContentType"])


@pytest.fixture(scope="module")
def s3_server(
    tmp_path_factory: pytest.TempPathFactory,
    s3_endpoint: str,  # noqa: F811
) -> Iterator[tuple[ServerProcess, str]]:
    bucket = new_bucket_name()  # the server creates it at start
    proc = start_server(
        tmp_path_factory.mktemp("server-s3"),
        ARCHIVE_SNAPSHOT_INTERVAL=1,
        **s3_env(s3_endpoint, bucket),
    )
    yield proc, bucket
    proc.stop()


async def test_the_whole_flow_on_s3(
    s3_server: tuple[ServerProcess, str],
    s3_endpoint: str,  # noqa: F811
    tokens: TokenCodec,
) -> None:
    server, bucket = s3_server
    alice = Named(tokens, "alice", "Alice")
    bob = Named(tokens, "bob", None)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as http:
        sid = await create(http, alice, "s3", bob)
        await say(http, alice, sid, "sending a photo and a big PDF")
        photo_bytes = jpeg_with_exif((900, 600))
        photo = (await upload(http, alice.headers, sid, "사진.jpg", photo_bytes)).json()
        big = pdf_bytes(filler=9 * 1024 * 1024)  # over the 8 MiB part size: a multipart upload
        doc = (await upload(http, bob.headers, sid, "big.pdf", big, "application/pdf")).json()
        dropped = (await upload(http, bob.headers, sid, "drop.png", png_bytes())).json()
        pid, did, xid = photo["file_id"], doc["file_id"], dropped["file_id"]

        assert await bucket_keys(s3_endpoint, bucket, "files/") == sorted(
            [
                f"files/{sid}/{pid}",
                f"files/{sid}/{pid}.thumb.jpg",
                f"files/{sid}/{did}",
                f"files/{sid}/{xid}",
                f"files/{sid}/{xid}.thumb.jpg",
            ]
        )
        stored, content_type = await bucket_object(s3_endpoint, bucket, f"files/{sid}/{pid}")
        assert stored == photo_bytes and content_type == "image/jpeg"
        stored, content_type = await bucket_object(s3_endpoint, bucket, f"files/{sid}/{did}")
        assert stored == big and content_type == "application/pdf"
        # Nothing lands on the local disk in S3 mode.
        assert blobs_under(server.data_dir / "storage") == set()

        got = await http.get(photo["file_url"], headers=bob.headers)
        assert got.status_code == 200 and got.content == photo_bytes
        disposition = got.headers["content-disposition"]
        assert disposition.endswith("filename*=UTF-8''%EC%82%AC%EC%A7%84.jpg")
        got = await http.get(doc["file_url"], headers=alice.headers)
        assert got.content == big
        part = await http.get(
            doc["file_url"], headers={**alice.headers, "Range": "bytes=8388600-8388615"}
        )
        assert part.status_code == 206 and part.content == big[8388600:8388616]
        tail = await http.get(doc["file_url"], headers={**alice.headers, "Range": "bytes=-7"})
        assert tail.status_code == 206 and tail.content == big[-7:]
        thumb = await http.get(photo["thumbnail_url"], headers=bob.headers)
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        assert (
            thumb.content
            == (await bucket_object(s3_endpoint, bucket, f"files/{sid}/{pid}.thumb.jpg"))[0]
        )
        assert b"Exif" not in thumb.content

        # Deleting the message removes its objects.
        deleted = await http.delete(f"{API}/messages/{dropped['message_id']}", headers=bob.headers)
        assert deleted.status_code == 200
        assert not [k for k in await bucket_keys(s3_endpoint, bucket, "files/") if xid in k]
        assert_not_found(await http.get(dropped["file_url"], headers=bob.headers), "FILE_NOT_FOUND")

        # The snapshot job writes to the bucket too ...
        prefix = f"temp/chat_{sid}_snapshot_"

        async def snapshot_exists() -> bool:
            return bool(await bucket_keys(s3_endpoint, bucket, prefix))

        await eventually(snapshot_exists, 10, "a snapshot in the bucket")
        [snapshot] = (await bucket_keys(s3_endpoint, bucket, prefix))[-1:]
        assert STAMP.search(snapshot), snapshot
        snapshot_text, _ = await bucket_object(s3_endpoint, bucket, snapshot)
        assert "Content: sending a photo and a big PDF" in snapshot_text.decode()

        # ... and ending archives there and removes the snapshots.
        ended = await end(http, alice, sid)
        assert ended["archive"]["state"] == "done"
        assert await bucket_keys(s3_endpoint, bucket, "archive/") == [
            f"archive/chat_{sid}_final.json",
            f"archive/chat_{sid}_final.txt",
        ]
        assert await bucket_keys(s3_endpoint, bucket, prefix) == []
        archived = await http.get(f"{API}/sessions/{sid}/archive", headers=bob.headers)
        stored, content_type = await bucket_object(
            s3_endpoint, bucket, f"archive/chat_{sid}_final.txt"
        )
        assert archived.status_code == 200 and archived.content == stored
        assert content_type.startswith("text/plain")
        assert f"File: big.pdf (application/pdf, {len(big)} bytes) /files/{did}" in archived.text
        as_json = await http.get(f"{API}/sessions/{sid}/archive?format=json", headers=bob.headers)
        assert (
            as_json.content
            == (await bucket_object(s3_endpoint, bucket, f"archive/chat_{sid}_final.json"))[0]
        )
        assert blobs_under(server.data_dir / "storage") == set()


# -- two instances ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster_database() -> Iterator[str]:
    """A PostgreSQL database of the cluster's own: the snapshot job visits every live
    session in its database, so other tests' sessions must not be in it."""
    name = f"chatservice_archives_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    asyncio.run(_create_database(name))
    url = _with_database(POSTGRES_ADMIN_URL, name)
    upgrade(url.replace("postgresql://", "postgresql+asyncpg://", 1))
    yield url
    asyncio.run(_drop_database(name))


SNAPSHOT_INTERVAL = 1.0


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory,
    cluster_database: str,
    s3_endpoint: str,  # noqa: F811
) -> Iterator[tuple[Cluster, str]]:
    bucket = new_bucket_name()
    made = start_cluster(
        tmp_path_factory.mktemp("archives-cluster"),
        cluster_database,
        ARCHIVE_SNAPSHOT_INTERVAL=SNAPSHOT_INTERVAL,
        ARCHIVE_SNAPSHOT_KEEP=1000,
        **s3_env(s3_endpoint, bucket),
    )
    yield made, bucket
    made.stop()


def snapshot_runs(server: ServerProcess) -> list[float]:
    """When this instance's snapshot job ran and wrote something (from its log)."""
    runs = []
    for line in server.log().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if str(record.get("message", "")).startswith("job snapshots:"):
            runs.append(datetime.fromisoformat(record["time"]).timestamp())
    return runs


async def test_two_instances_share_files_and_run_each_job_once_per_interval(
    cluster: tuple[Cluster, str],
    s3_endpoint: str,  # noqa: F811
    tokens: TokenCodec,
) -> None:
    made, bucket = cluster
    a, b = made.a, made.b
    alice = Named(tokens, "alice", "Alice")
    bob = Named(tokens, "bob", None)
    async with (
        httpx.AsyncClient(base_url=a.base_url, timeout=30) as on_a,
        httpx.AsyncClient(base_url=b.base_url, timeout=30) as on_b,
    ):
        sid = await create(on_a, alice, "two instances", bob)
        bob_ws = await connected(b, sid, bob.token)
        try:
            data = jpeg_with_exif()
            sent = await upload(on_a, alice.headers, sid, "shared.jpg", data, message="from A")
            assert sent.status_code == 201, sent.text
            body = sent.json()
            frame = await next_message(bob_ws)  # bob is on B
            assert frame["metadata"]["file_info"]["file_id"] == body["file_id"]
            got = await on_b.get(body["file_url"], headers=bob.headers)
            assert got.status_code == 200 and got.content == data
            thumb = await on_b.get(body["thumbnail_url"], headers=bob.headers)
            assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"
            ranged = await on_b.get(body["file_url"], headers={**bob.headers, "Range": "bytes=2-9"})
            assert ranged.status_code == 206 and ranged.content == data[2:10]
        finally:
            await bob_ws.close()

        # Talk steadily for a few intervals: each interval has news to snapshot. With the
        # lease, one instance snapshots per interval; without it, both would.
        started = time.time()
        for i in range(30):
            await say(on_a if i % 2 else on_b, alice, sid, f"tick {i}")
            await asyncio.sleep(0.2)
        active = time.time() - started
        # One more run can snapshot the last ticks; then nothing changes any more.
        await asyncio.sleep(SNAPSHOT_INTERVAL * 1.5)
        runs_a = [t for t in snapshot_runs(a) if t >= started]
        runs_b = [t for t in snapshot_runs(b) if t >= started]
        runs = sorted(runs_a + runs_b)
        windows = active / SNAPSHOT_INTERVAL
        assert runs, made.logs()
        assert len(runs) <= windows / 0.9 + 3, (
            f"{len(runs)} snapshot runs in {active:.1f}s at a {SNAPSHOT_INTERVAL}s interval "
            f"(A: {len(runs_a)}, B: {len(runs_b)}): the job ran on both instances"
        )
        assert len(runs) >= windows / 2 - 1, (len(runs), active)
        gaps = [later - earlier for earlier, later in pairwise(runs)]
        # The lease lasts 0.9 intervals: no two runs (on either instance) come closer.
        assert min(gaps, default=1.0) >= SNAPSHOT_INTERVAL * 0.7, gaps
        keys = await bucket_keys(s3_endpoint, bucket, f"temp/chat_{sid}_snapshot_")
        assert 1 <= len(keys) <= len(runs)

        # Ending on B archives once into the shared bucket; A serves it.
        ended = await end(on_b, alice, sid)
        assert ended["archive"]["state"] == "done"
        assert (await end(on_a, alice, sid))["archive"] == ended["archive"]
        archived = await on_a.get(f"{API}/sessions/{sid}/archive", headers=bob.headers)
        assert archived.status_code == 200 and "Content: tick 29" in archived.text
        assert await bucket_keys(s3_endpoint, bucket, f"temp/chat_{sid}_snapshot_") == []


# -- last: the server that could not reach S3 ----------------------------------------------


def test_an_unreachable_s3_refuses_to_start_with_one_line(
    unreachable_s3_start: tuple[subprocess.Popen[bytes], Path],
) -> None:
    process, out = unreachable_s3_start
    try:
        code = process.wait(60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running 60 s after start:\n{out.read_text()[-2000:]}")
    said = out.read_text(errors="replace")
    assert code == 2, said
    errors = [line for line in said.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, said
    assert errors[0].startswith("error: cannot use the S3 bucket "), errors[0]
    assert said.rstrip().splitlines()[-1] == errors[0]
    assert "Traceback" not in said
