"""Shutdown and failure lose no answer, and a committed deletion is never reported as failed.

Real server processes: SIGTERM while the demo agent streams, a restart on the same data
directory, and a blob store (moto's S3 server) that goes away and comes back.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from chatservice.auth import TokenCodec
from tests.conftest import TEST_SECRET, ServerProcess, free_port, new_user, start_server
from tests.e2e.agent_helpers import raw_reader, read_answer
from tests.e2e.conftest import bearer, frames_until_pong, recv_until, ws_url
from tests.e2e.test_archives import s3_env
from tests.s3_server import s3_client, start_moto

API = "/api/chat"
JSON = dict[str, Any]
SLOW_AGENT = {"STREAM_CHUNK_SIZE": 2, "STREAM_DELAY_MS": 150}


async def agent_session(server: ServerProcess, token: str) -> str:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
        created = await http.post(
            f"{API}/sessions", json={"agent_id": 1, "title": "q"}, headers=bearer(token)
        )
        assert created.status_code == 201, created.text
        return str(created.json()["session_id"])


async def history(server: ServerProcess, sid: str, token: str) -> list[JSON]:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
        page = await http.get(f"{API}/sessions/{sid}/messages?limit=200", headers=bearer(token))
        assert page.status_code == 200, page.text
        return list(page.json()["messages"])


async def until(check: Any, what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = await check()
        if found:
            return found
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


async def test_sigterm_finishes_or_stores_the_answer_and_a_restart_answers_the_queue(
    tmp_path: Path,
) -> None:
    """The answer streaming at SIGTERM reaches its connected client's `stream_end` and is
    stored with its partial text; the question queued behind it is answered after the
    restart without anyone sending another message."""
    data_dir = tmp_path / "data"
    env = {**SLOW_AGENT, "AGENT_SHUTDOWN_GRACE": "0.5"}
    server = start_server(data_dir, **env)
    user = new_user("asker")
    token = TokenCodec(TEST_SECRET).issue(user)
    sid = await agent_session(server, token)
    ws = await websockets.connect(ws_url(server, sid, token), max_queue=4096)
    try:
        await frames_until_pong(ws)
        await ws.send('{"type": "message", "content": "first question, a long one"}')
        await ws.send('{"type": "message", "content": "second question"}')
        answer = await read_answer(raw_reader(ws), until_chunks=2)
        server.process.send_signal(signal.SIGTERM)
        answer = await read_answer(raw_reader(ws), answer=answer, timeout=15)
        assert answer.end is not None
        end = answer.end
        assert end["status"] == "error" and isinstance(end["seq"], int), end
        assert any(e.get("code") == "AGENT_ERROR" for e in answer.errors), answer.errors
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                await asyncio.wait_for(ws.recv(), 15)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
    finally:
        await ws.close()
        server.process.wait(30)
    # uvicorn re-raises the signal once it has shut down cleanly: "killed by SIGTERM".
    assert server.process.returncode == -signal.SIGTERM, server.log()[-2000:]
    assert "Traceback" not in server.log()

    restarted = start_server(data_dir, **env)
    try:
        stored = {m["message_id"]: m for m in await history(restarted, sid, token)}
        partial = stored[answer.message_id]
        assert partial["metadata"]["status"] == "error"
        assert partial["content"] == answer.text and partial["content"]
        assert "shut down" in partial["metadata"]["error"]

        async def second_answered() -> JSON | None:
            for message in await history(restarted, sid, token):
                if message["sender_type"] == "agent" and message["seq"] > partial["seq"]:
                    return message
            return None

        second = await until(second_answered, "the queued question to be answered")
        assert second["metadata"]["status"] == "completed"
    finally:
        restarted.stop()


async def test_a_question_left_by_a_killed_instance_is_answered_without_a_new_message(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    server = start_server(data_dir, **SLOW_AGENT)
    user = new_user("orphan")
    token = TokenCodec(TEST_SECRET).issue(user)
    sid = await agent_session(server, token)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
        sent = await http.post(
            f"{API}/sessions/{sid}/messages",
            json={"content": "are you there?"},
            headers=bearer(token),
        )
        assert sent.status_code == 201
    await asyncio.sleep(0.5)  # the answer has started
    server.process.kill()
    server.process.wait(10)

    restarted = start_server(data_dir, **SLOW_AGENT, AGENT_ORPHAN_CHECK_INTERVAL=1)
    try:

        async def answered() -> JSON | None:
            agents = [
                m for m in await history(restarted, sid, token) if m["sender_type"] == "agent"
            ]
            done = [m for m in agents if m["metadata"].get("status") == "completed"]
            return done[0] if done else None

        answer = await until(answered, "the orphaned question to be answered")
        assert answer["metadata"]["reply_to"] == sent.json()["message_id"]
    finally:
        restarted.stop()


def start_moto_on(port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """moto on a fixed port, so a restarted blob store is found where the server looks."""
    return start_moto(log_path, port)[1]


def blobs_pending(data_dir: Path) -> int:
    with sqlite3.connect(data_dir / "chat.db") as db:
        return int(
            db.execute(
                "SELECT count(*) FROM chat_files "
                "WHERE deleted_at IS NOT NULL AND blobs_removed_at IS NULL"
            ).fetchone()[0]
        )


async def test_deleting_while_the_blob_store_is_down_succeeds_and_cleans_up_later(
    tmp_path: Path,
) -> None:
    port = free_port()
    moto = start_moto_on(port, tmp_path / "moto.log")
    endpoint = f"http://127.0.0.1:{port}"
    data_dir = tmp_path / "data"
    server = start_server(data_dir, **s3_env(endpoint, "blobs-down"), SESSION_IDLE_CHECK_INTERVAL=1)
    codec = TokenCodec(TEST_SECRET)
    alice, bob = new_user("alice"), new_user("bob")
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            created = await http.post(
                f"{API}/sessions",
                json={"title": "t", "participants": [bob]},
                headers=bearer(codec.issue(alice)),
            )
            sid = created.json()["session_id"]
            uploaded = await http.post(
                f"{API}/sessions/{sid}/files",
                files={"file": ("note.txt", b"hello there", "text/plain")},
                headers=bearer(codec.issue(alice)),
            )
            assert uploaded.status_code == 201, uploaded.text
            message_id = uploaded.json()["message_id"]
            async with websockets.connect(ws_url(server, sid, codec.issue(bob))) as watcher:
                await frames_until_pong(watcher)
                moto.terminate()
                moto.wait(10)
                deleted = await http.delete(
                    f"{API}/messages/{message_id}", headers=bearer(codec.issue(alice))
                )
                assert deleted.status_code == 200, deleted.text
                event = await recv_until(watcher, "message_deleted", timeout=10)
                assert event["message_id"] == message_id
            assert blobs_pending(data_dir) == 1
            gone = await http.get(
                f"/files/{uploaded.json()['file_id']}", headers=bearer(codec.issue(alice))
            )
            assert gone.status_code == 404
            # The blob store comes back (moto keeps nothing: the bucket is made again, as a
            # real S3 would still have it).
            moto = start_moto_on(port, tmp_path / "moto.log")
            async with s3_client(endpoint) as s3:
                await s3.create_bucket(Bucket="blobs-down")

            async def cleaned() -> bool:
                return blobs_pending(data_dir) == 0

            await until(cleaned, "the blob cleanup to be retried", timeout=30)
    finally:
        server.stop()
        moto.terminate()
        moto.wait(10)
