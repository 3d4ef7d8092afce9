"""Concurrent writers: seq stays gap-free and strictly increasing.

Every test runs on SQLite and on PostgreSQL; the last one also proves it across two
independently pooled service instances sharing one PostgreSQL database.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from chatservice.app import build_components
from chatservice.components import Components
from chatservice.config import Settings
from chatservice.domain import Message, NewSession, Principal, SendResult
from chatservice.services.errors import SessionClosed
from chatservice.services.messages import Draft
from tests.conftest import TEST_SECRET
from tests.integration.helpers import as_utc, group, users

SENDERS = 25
PER_SENDER = 8  # 200 messages in all


async def all_messages(parts: Components, who: Principal, sid: str) -> list[Message]:
    messages: list[Message] = []
    after = "0"
    while True:
        page = await parts.messages.page(who, sid, before=None, after=after, limit=200)
        messages += page.messages
        if not page.has_more:
            return messages
        after = str(page.messages[-1].seq)


def assert_gap_free(stored: list[Message], expected: int) -> None:
    seqs = [m.seq for m in stored]
    duplicates = [seq for seq, n in Counter(seqs).items() if n > 1]
    assert duplicates == [], f"duplicate seqs {duplicates}"
    missing = sorted(set(range(1, expected + 1)) - set(seqs))
    assert missing == [], f"missing seqs {missing}"
    assert seqs == list(range(1, expected + 1))


async def test_concurrent_senders_get_gap_free_seqs(parts: Components) -> None:
    senders = users(SENDERS, "sender")
    owner = senders[0]
    sid = await group(parts, owner, *senders[1:])
    drafts = [
        (who, f"{who.user_id}#{i}") for i in range(PER_SENDER) for who in senders
    ]  # interleaved
    results: list[SendResult] = await asyncio.gather(
        *(parts.messages.send(who, sid, Draft(content=text)) for who, text in drafts)
    )
    total = SENDERS * PER_SENDER
    assert sorted(r.message.seq for r in results) == list(range(1, total + 1))
    assert all(r.created for r in results)

    stored = await all_messages(parts, owner, sid)
    assert_gap_free(stored, total)
    # Each stored message is the one its sender sent, under the seq it was told.
    told = {r.message.message_id: r.message for r in results}
    for message in stored:
        sent = told[message.message_id]
        assert (message.seq, message.sender_id, message.content) == (
            sent.seq,
            sent.sender_id,
            sent.content,
        )
        assert message.content.startswith(message.sender_id + "#")
    # Nothing was lost or swapped between senders.
    for who in senders:
        mine = {m.content for m in stored if m.sender_id == who.user_id}
        assert mine == {f"{who.user_id}#{i}" for i in range(PER_SENDER)}
    detail = await parts.sessions.detail(owner, sid)
    assert (detail.session.last_seq, detail.message_count) == (total, total)


async def test_concurrent_writers_in_many_sessions_keep_separate_sequences(
    parts: Components,
) -> None:
    alice, bob = users(2)
    sessions = [await group(parts, alice, bob) for _ in range(5)]
    per_session = 30
    await asyncio.gather(
        *(
            parts.messages.send(alice if i % 2 else bob, sid, Draft(content=f"{sid}:{i}"))
            for i in range(per_session)
            for sid in sessions
        )
    )
    for sid in sessions:
        stored = await all_messages(parts, alice, sid)
        assert_gap_free(stored, per_session)
        assert {m.content.split(":")[0] for m in stored} == {sid}


async def test_concurrent_retries_of_one_client_msg_id_store_one_message(
    parts: Components,
) -> None:
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    retries = [
        parts.messages.send(alice, sid, Draft(content="only once", client_msg_id="dup-1"))
        for _ in range(15)
    ]
    others = [parts.messages.send(bob, sid, Draft(content=f"bob {i}")) for i in range(15)]
    results = await asyncio.gather(*retries, *others)
    mine = results[:15]
    assert sum(r.created for r in mine) == 1
    assert len({r.message.message_id for r in mine}) == 1
    stored = await all_messages(parts, alice, sid)
    assert [m.client_msg_id for m in stored].count("dup-1") == 1
    assert_gap_free(stored, 16)  # the losing retries gave their seq back


async def test_message_times_follow_seq_order_under_concurrent_writers(
    parts: Components,
) -> None:
    """Time cursors page by `created_at` and pages are in seq order: the two must agree.

    If a later seq can carry an earlier time, walking history with `before=<time>` skips
    messages (the paging API accepts a time wherever it accepts a seq).
    """
    senders = users(SENDERS, "clock")
    sid = await group(parts, senders[0], *senders[1:])
    await asyncio.gather(
        *(
            parts.messages.send(who, sid, Draft(content=f"{who.user_id}#{i}"))
            for i in range(PER_SENDER)
            for who in senders
        )
    )
    stored = await all_messages(parts, senders[0], sid)
    inversions = [
        (a.seq, b.seq)
        for a, b in itertools.pairwise(stored)
        if as_utc(b.created_at) < as_utc(a.created_at)  # type: ignore[operator]
    ]
    assert inversions == [], f"{len(inversions)} later seqs with earlier created_at"


async def test_sends_racing_an_end_leave_no_gap(parts: Components) -> None:
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    await parts.messages.send(bob, sid, Draft(content="first"))

    async def sender(i: int) -> SendResult | None:
        try:
            return await parts.messages.send(bob, sid, Draft(content=f"m{i}"))
        except SessionClosed:
            return None

    tasks = [sender(i) for i in range(40)]
    tasks.insert(20, parts.sessions.end(alice, sid))  # type: ignore[arg-type]
    outcomes = await asyncio.gather(*tasks)
    accepted = [o for o in outcomes if isinstance(o, SendResult)]
    stored = await all_messages(parts, alice, sid)
    assert_gap_free(stored, 1 + len(accepted))
    detail = await parts.sessions.detail(alice, sid)
    assert detail.session.status == "archived"
    assert detail.session.last_seq == 1 + len(accepted)
    with pytest.raises(SessionClosed):
        await parts.messages.send(bob, sid, Draft(content="late"))


# -- two service instances on one PostgreSQL database ---------------------------------------


@pytest.fixture
async def two_instances(
    in_process_postgres_url: str, tmp_path: Path
) -> AsyncIterator[list[Components]]:
    """Two independently wired services (own engine and pool each) on one database."""
    instances = []
    for name in ("a", "b"):
        settings = Settings(
            database_url=in_process_postgres_url,
            jwt_secret_key=TEST_SECRET,
            data_dir=tmp_path / name,
            database_pool_size=10,
            database_max_overflow=10,
            _env_file=None,
        )
        parts = build_components(settings)
        await parts.bus.start()
        instances.append(parts)
    yield instances
    for parts in instances:
        await parts.bus.close()
        await parts.database.close()


@pytest.mark.postgres
async def test_two_instances_with_separate_pools_share_one_gap_free_sequence(
    two_instances: list[Components],
) -> None:
    first, second = two_instances
    assert first.database.engine is not second.database.engine
    assert not first.database.is_sqlite
    senders = users(SENDERS, "pool")
    detail, _ = await first.sessions.create(
        senders[0], NewSession(kind="group", participants=[w.user_id for w in senders[1:]])
    )
    sid = detail.session.session_id
    sends = [
        (first if (i + n) % 2 else second).messages.send(
            who, sid, Draft(content=f"{who.user_id}#{i}")
        )
        for i in range(PER_SENDER)
        for n, who in enumerate(senders)
    ]
    results = await asyncio.gather(*sends)
    total = SENDERS * PER_SENDER
    assert sorted(r.message.seq for r in results) == list(range(1, total + 1))
    for reader in (first, second):
        stored = await all_messages(reader, senders[0], sid)
        assert_gap_free(stored, total)
        assert [m.message_id for m in stored] == [
            m.message_id for m in sorted(stored, key=lambda m: (as_utc(m.created_at), m.seq))
        ], "created_at must follow seq across instances too"
        told = {r.message.message_id: r.message for r in results}
        assert all(
            (m.seq, m.sender_id, m.content)
            == (told[m.message_id].seq, told[m.message_id].sender_id, told[m.message_id].content)
            for m in stored
        )
