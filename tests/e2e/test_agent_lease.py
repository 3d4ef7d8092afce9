"""An instance that stalls in the middle of an answer does not answer the question twice.

Two real instances on one Redis and one PostgreSQL, the demo agent slowed down. Instance
a starts answering; it is then stopped (SIGSTOP) for several agent leases, as a blocked
event loop or a paused VM would. Instance b's orphan check finds the lease gone, ends a's
stream as an error and answers the question itself. When a resumes, it must notice that
it lost the lease and stop, and whatever it does, the question has exactly one stored
answer.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from chatservice.auth import TokenCodec
from tests.conftest import new_user
from tests.e2e.scaleout_helpers import Cluster, start_cluster, unhandled_errors

LEASE = 2.0
STALL = 3 * LEASE
API = "/api/chat"


@pytest.fixture
def cluster(tmp_path: Path, postgres_url: str) -> Iterator[Cluster]:
    made = start_cluster(
        tmp_path,
        postgres_url,
        AGENT_LEASE_SECONDS=LEASE,
        AGENT_ORPHAN_CHECK_INTERVAL=0.5,
        STREAM_CHUNK_SIZE=3,
        STREAM_DELAY_MS=40,  # a demo answer streams for about 3.5 s
    )
    yield made
    made.stop()


async def stored_answers(
    http: httpx.AsyncClient, sid: str, question: str
) -> list[dict[str, object]]:
    page = await http.get(f"{API}/sessions/{sid}/messages", params={"limit": 200})
    assert page.status_code == 200, page.text
    return [
        m
        for m in page.json()["messages"]
        if m["message_type"] == "stream" and (m.get("metadata") or {}).get("reply_to") == question
    ]


async def test_a_stalled_instance_does_not_store_a_second_answer(
    cluster: Cluster, tokens: TokenCodec
) -> None:
    user = new_user("stall")
    headers = {"Authorization": f"Bearer {tokens.issue(user)}"}
    a = httpx.AsyncClient(base_url=cluster.a.base_url, headers=headers, timeout=10)
    b = httpx.AsyncClient(base_url=cluster.b.base_url, headers=headers, timeout=10)
    try:
        created = await a.post(f"{API}/sessions", json={"kind": "agent", "agent_id": 1})
        assert created.status_code == 201, created.text
        sid = created.json()["session_id"]
        sent = await a.post(f"{API}/sessions/{sid}/messages", json={"content": "hello"})
        assert sent.status_code == 201, sent.text
        question = sent.json()["message_id"]
        await asyncio.sleep(0.8)  # a's worker (the instance that stored it) is streaming

        os.kill(cluster.a.process.pid, signal.SIGSTOP)
        try:
            # b takes over once a's lease has run out, and stores its own answer.
            deadline = time.monotonic() + STALL
            answers: list[dict[str, object]] = []
            while time.monotonic() < deadline and not answers:
                await asyncio.sleep(0.2)
                answers = await stored_answers(b, sid, question)
            assert len(answers) == 1, "instance b did not answer while a was stopped"
        finally:
            os.kill(cluster.a.process.pid, signal.SIGCONT)

        # a wakes up mid-answer; give it time to finish whatever it would do.
        await asyncio.sleep(4 * LEASE)
        answers = await stored_answers(b, sid, question)
        assert len(answers) == 1, answers
        assert answers[0]["metadata"]["status"] == "completed"  # type: ignore[index]
        # Nothing else is waiting for an answer, and nothing more arrives.
        page = await b.get(f"{API}/sessions/{sid}/messages", params={"limit": 200})
        kinds = [m["message_type"] for m in page.json()["messages"]]
        assert kinds == ["text", "stream"], kinds
        assert "lost lease agent:" in cluster.a.log()
        assert not unhandled_errors(cluster.logs()), cluster.logs()
    finally:
        await a.aclose()
        await b.aclose()
