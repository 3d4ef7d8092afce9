"""Messages over REST: sending (idempotent retries), history pages, read watermark."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx

from tests.e2e.conftest import User, Users

API = "/api/chat"


async def _session_with(alice: User, count: int, others: list[str] | None = None) -> str:
    sid = (await alice.client.create_session(title="history", participants=others or []))[
        "session_id"
    ]
    for i in range(1, count + 1):
        await alice.client.send_message(sid, f"m{i}")
    return sid


def seqs(body: dict[str, Any]) -> list[int]:
    return [m["seq"] for m in body["messages"]]


async def test_send_answers_201_with_id_seq_status_and_time(
    http: httpx.AsyncClient, users: Users
) -> None:
    alice = users("alice")
    sid = (await alice.client.create_session(title="send"))["session_id"]
    response = await http.post(
        f"{API}/sessions/{sid}/messages",
        headers=alice.headers,
        json={
            "content": "제품 반품 문의입니다.",
            "message_type": "text",
            "metadata": {"device": "web"},
        },
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["message_id"].startswith("msg_")
    assert body["seq"] == 1
    assert body["status"] == "sent"
    assert body["created_at"].endswith("Z")

    second = await http.post(
        f"{API}/sessions/{sid}/messages", headers=alice.headers, json={"content": "again"}
    )
    assert second.status_code == 201
    assert second.json()["seq"] == 2
    assert second.json()["message_id"] != body["message_id"]

    [first, _] = (await alice.client.list_messages(sid))["messages"]
    assert first["message_id"] == body["message_id"]
    assert first["sender_type"] == "user"
    assert first["sender_id"] == alice.id
    assert first["message_type"] == "text"
    assert first["content"] == "제품 반품 문의입니다."
    assert first["metadata"] == {"device": "web"}
    assert first["created_at"] == body["created_at"]


async def test_client_msg_id_retry_returns_the_original_with_200(
    http: httpx.AsyncClient, users: Users
) -> None:
    alice, bob = users("alice"), users("bob")
    sid = (await alice.client.create_session(title="retry", participants=[bob.id]))["session_id"]
    url = f"{API}/sessions/{sid}/messages"
    payload = {"content": "only once", "client_msg_id": "c-1"}
    first = await http.post(url, headers=alice.headers, json=payload)
    assert first.status_code == 201, first.text
    retry = await http.post(url, headers=alice.headers, json=payload)
    assert retry.status_code == 200, retry.text
    assert retry.json()["message_id"] == first.json()["message_id"]
    assert retry.json()["seq"] == first.json()["seq"]
    assert retry.json()["status"] == "sent"

    # A retry that changed the content still returns the original: the id decides.
    changed = await http.post(
        url, headers=alice.headers, json={"content": "edited?", "client_msg_id": "c-1"}
    )
    assert changed.status_code == 200
    assert changed.json()["message_id"] == first.json()["message_id"]

    # Another sender may use the same client_msg_id: it is scoped per sender.
    other = await http.post(url, headers=bob.headers, json=payload)
    assert other.status_code == 201
    assert other.json()["message_id"] != first.json()["message_id"]

    history = await alice.client.history(sid)
    assert [(m["sender_id"], m["content"]) for m in history] == [
        (alice.id, "only once"),
        (bob.id, "only once"),
    ]


async def test_concurrent_retries_store_one_message(users: Users) -> None:
    alice = users("alice")
    sid = (await alice.client.create_session(title="race"))["session_id"]
    results = await asyncio.gather(
        *(alice.client.send_message(sid, "dup", client_msg_id="same") for _ in range(8))
    )
    assert len({r["message_id"] for r in results}) == 1
    assert (await alice.client.list_messages(sid))["total"] == 1


async def test_default_page_is_newest_50_ascending(http: httpx.AsyncClient, users: Users) -> None:
    alice = users("alice")
    sid = await _session_with(alice, 55)
    response = await http.get(f"{API}/sessions/{sid}/messages", headers=alice.headers)
    assert response.status_code == 200, response.text
    body = response.json()
    assert seqs(body) == list(range(6, 56))
    assert body["has_more"] is True
    assert body["total"] == 55
    assert [m["content"] for m in body["messages"]][:2] == ["m6", "m7"]


async def test_paging_by_seq(users: Users) -> None:
    alice = users("alice")
    sid = await _session_with(alice, 10)
    c = alice.client

    newest = await c.list_messages(sid, limit=3)
    assert (seqs(newest), newest["has_more"], newest["total"]) == ([8, 9, 10], True, 10)
    everything = await c.list_messages(sid, limit=10)
    assert (seqs(everything), everything["has_more"]) == (list(range(1, 11)), False)

    before = await c.list_messages(sid, limit=3, before=8)
    assert (seqs(before), before["has_more"]) == ([5, 6, 7], True)
    first_page = await c.list_messages(sid, limit=3, before=4)
    assert (seqs(first_page), first_page["has_more"]) == ([1, 2, 3], False)
    start = await c.list_messages(sid, limit=3, before=1)
    assert (seqs(start), start["has_more"]) == ([], False)

    after = await c.list_messages(sid, limit=2, after=7)
    assert (seqs(after), after["has_more"]) == ([8, 9], True)
    tail = await c.list_messages(sid, limit=5, after=8)
    assert (seqs(tail), tail["has_more"]) == ([9, 10], False)
    beyond = await c.list_messages(sid, limit=5, after=10)
    assert (seqs(beyond), beyond["has_more"]) == ([], False)

    window = await c.list_messages(sid, limit=50, after=3, before=7)
    assert seqs(window) == [4, 5, 6]
    assert window["total"] == 10
    # In a window has_more looks forward, and stops at `before`.
    part = await c.list_messages(sid, limit=2, after=3, before=7)
    assert (seqs(part), part["has_more"]) == ([4, 5], True)
    whole = await c.list_messages(sid, limit=3, after=3, before=7)
    assert (seqs(whole), whole["has_more"]) == ([4, 5, 6], False)


async def test_paging_by_timestamp(users: Users) -> None:
    alice = users("alice")
    sid = await _session_with(alice, 6)
    messages = (await alice.client.list_messages(sid))["messages"]
    times = [m["created_at"] for m in messages]
    assert times == sorted(times) and len(set(times)) == 6, times

    after = await alice.client.list_messages(sid, after=times[2])  # strictly after seq 3
    assert seqs(after) == [4, 5, 6]
    before = await alice.client.list_messages(sid, before=times[2])  # strictly before seq 3
    assert seqs(before) == [1, 2]
    window = await alice.client.list_messages(sid, after=times[0], before=times[4])
    assert seqs(window) == [2, 3, 4]

    # The same instant written with another offset selects the same messages.
    instant = datetime.fromisoformat(times[2].replace("Z", "+00:00"))
    seoul = instant.astimezone(timezone(timedelta(hours=9))).isoformat()
    assert seqs(await alice.client.list_messages(sid, after=seoul)) == [4, 5, 6]
    # A time before everything and one after everything.
    early = (instant - timedelta(days=1)).isoformat()
    late = (instant + timedelta(days=1)).isoformat()
    assert seqs(await alice.client.list_messages(sid, after=early)) == [1, 2, 3, 4, 5, 6]
    assert seqs(await alice.client.list_messages(sid, after=late)) == []
    assert seqs(await alice.client.list_messages(sid, before=early)) == []


async def test_sdk_history_follows_pages(users: Users) -> None:
    alice = users("alice")
    sid = await _session_with(alice, 7)
    history = await alice.client.history(sid, page=3)
    assert [m["seq"] for m in history] == list(range(1, 8))
    assert [m["seq"] for m in await alice.client.history(sid, after_seq=5, page=1)] == [6, 7]


async def test_read_watermark_drives_unread_count(users: Users) -> None:
    alice, bob = users("alice"), users("bob")
    sid = await _session_with(alice, 4, others=[bob.id])

    async def bob_unread() -> int:
        [entry] = (await bob.client.list_sessions())["sessions"]
        return int(entry["unread_count"])

    assert await bob_unread() == 4
    read = await bob.client.mark_read(sid, 2)
    assert read == {"session_id": sid, "last_read_seq": 2, "unread_count": 2}
    assert await bob_unread() == 2
    assert (await bob.client.get_session(sid))["last_read_seq"] == 2

    # The watermark never moves back.
    back = await bob.client.mark_read(sid, 1)
    assert back["last_read_seq"] == 2 and back["unread_count"] == 2

    # Beyond the last message: clamped to it.
    ahead = await bob.client.mark_read(sid, 999)
    assert ahead["last_read_seq"] == 4 and ahead["unread_count"] == 0
    assert await bob_unread() == 0

    # New messages are unread again; bob's own never are.
    await alice.client.send_message(sid, "more")
    await bob.client.send_message(sid, "mine")
    assert await bob_unread() == 1
    # Alice's watermark is her own.
    [alice_entry] = (await alice.client.list_sessions())["sessions"]
    assert alice_entry["unread_count"] == 1


async def test_concurrent_senders_get_gap_free_seqs(users: Users) -> None:
    people = [users(f"p{i}") for i in range(8)]
    sid = (
        await people[0].client.create_session(
            title="crowd", participants=[p.id for p in people[1:]]
        )
    )["session_id"]
    per_person = 15

    async def send_all(person: User) -> list[int]:
        return [
            (await person.client.send_message(sid, f"{person.id} {i}"))["seq"]
            for i in range(per_person)
        ]

    results = await asyncio.gather(*(send_all(p) for p in people))
    total = len(people) * per_person
    assert sorted(seq for got in results for seq in got) == list(range(1, total + 1))
    for got in results:  # each sender's own messages are in the order it sent them
        assert got == sorted(got)
    history = await people[0].client.history(sid)
    assert [m["seq"] for m in history] == list(range(1, total + 1))
    for person, got in zip(people, results, strict=True):
        mine = [m for m in history if m["sender_id"] == person.id]
        assert [m["seq"] for m in mine] == got
        assert [m["content"] for m in mine] == [f"{person.id} {i}" for i in range(per_person)]
