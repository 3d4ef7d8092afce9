"""Sessions over REST, shaped as the A2G-compatible REST contract has them: create, list,
detail, delete, end, health."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from chatservice.client import ChatAPIError
from tests.conftest import ServerProcess
from tests.e2e.conftest import Users, close_code, ws_connect

API = "/api/chat"


def parse_time(value: str) -> datetime:
    assert isinstance(value, str) and value.endswith("Z"), value
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    assert moment.tzinfo is not None
    return moment


async def test_healthz_and_readyz_need_no_auth(http: httpx.AsyncClient) -> None:
    health = await http.get("/healthz")
    assert health.status_code == 200
    assert health.headers["content-type"].startswith("application/json")
    assert health.json() == {"status": "ok"}
    ready = await http.get("/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ready"
    assert body["checks"]["database"] == "ok"


async def test_create_group_session_201_with_a2g_fields(
    http: httpx.AsyncClient, users: Users
) -> None:
    alice, bob = users("alice"), users("bob")
    before = datetime.now(UTC)
    response = await http.post(
        f"{API}/sessions",
        headers=alice.headers,
        json={
            "title": "Team",
            "metadata": {"purpose": "planning"},
            # The creator and repeats are folded in: each member once.
            "participants": [bob.id, alice.id, bob.id],
        },
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["session_id"].startswith("sess_")
    assert body["trace_id"].startswith("trace_")
    assert body["user_id"] == alice.id
    assert body["agent_id"] is None
    assert body["kind"] == "group"
    assert body["title"] == "Team"
    assert body["status"] == "active"
    assert body["metadata"] == {"purpose": "planning"}
    assert sorted(body["participants"]) == sorted([alice.id, bob.id])
    created = parse_time(body["created_at"])
    assert abs((created - before).total_seconds()) < 60


async def test_create_agent_session_defaults_to_kind_agent(users: Users) -> None:
    alice = users("alice")
    body = await alice.client.create_session(agent_id=1, title="Customer Support Chat")
    assert body["kind"] == "agent"
    assert body["agent_id"] == 1
    assert body["participants"] == [alice.id]


async def test_direct_pair_is_created_once_then_returned_with_200(
    http: httpx.AsyncClient, users: Users
) -> None:
    alice, bob = users("alice"), users("bob")
    first = await http.post(
        f"{API}/sessions", headers=alice.headers, json={"kind": "direct", "participants": [bob.id]}
    )
    assert first.status_code == 201, first.text
    sid = first.json()["session_id"]
    assert first.json()["kind"] == "direct"

    again = await http.post(
        f"{API}/sessions", headers=alice.headers, json={"kind": "direct", "participants": [bob.id]}
    )
    assert again.status_code == 200, again.text
    assert again.json()["session_id"] == sid

    # The pair is unordered: bob asking for alice gets the same conversation.
    reverse = await http.post(
        f"{API}/sessions", headers=bob.headers, json={"kind": "direct", "participants": [alice.id]}
    )
    assert reverse.status_code == 200, reverse.text
    assert reverse.json()["session_id"] == sid

    listed = await alice.client.list_sessions()
    assert [s["session_id"] for s in listed["sessions"]] == [sid]


async def test_concurrent_direct_creation_yields_one_session(users: Users) -> None:
    alice, bob = users("alice"), users("bob")
    results = await asyncio.gather(
        *(alice.client.create_session(kind="direct", participants=[bob.id]) for _ in range(3)),
        *(bob.client.create_session(kind="direct", participants=[alice.id]) for _ in range(3)),
    )
    assert len({r["session_id"] for r in results}) == 1
    assert (await alice.client.list_sessions())["total"] == 1


async def test_list_has_total_has_more_and_pages_with_offset(users: Users) -> None:
    alice = users("alice")
    ids = []
    for i in range(5):
        ids.append((await alice.client.create_session(title=f"s{i}"))["session_id"])
    page1 = await alice.client.list_sessions(limit=2, offset=0)
    page2 = await alice.client.list_sessions(limit=2, offset=2)
    page3 = await alice.client.list_sessions(limit=2, offset=4)
    beyond = await alice.client.list_sessions(limit=2, offset=10)
    assert (beyond["sessions"], beyond["total"], beyond["has_more"]) == ([], 5, False)
    assert page1["total"] == page2["total"] == page3["total"] == 5
    assert (page1["has_more"], page2["has_more"], page3["has_more"]) == (True, True, False)
    assert [len(p["sessions"]) for p in (page1, page2, page3)] == [2, 2, 1]
    seen = [s["session_id"] for p in (page1, page2, page3) for s in p["sessions"]]
    assert sorted(seen) == sorted(ids)  # every session once, none twice


async def test_list_entry_shape_last_message_and_unread_count(users: Users) -> None:
    alice, bob = users("alice"), users("bob")
    sid = (await alice.client.create_session(title="chat", participants=[bob.id]))["session_id"]
    await alice.client.send_message(sid, "first")
    await alice.client.send_message(sid, "second")
    await bob.client.send_message(sid, "bob's own")

    [entry] = (await bob.client.list_sessions())["sessions"]
    assert entry["session_id"] == sid
    assert entry["title"] == "chat"
    assert entry["status"] == "active"
    assert entry["agent_id"] is None and entry["agent_name"] is None
    assert entry["last_message"] == "bob's own"
    parse_time(entry["last_message_at"])
    # Two messages from alice are unread for bob; his own message never counts.
    assert entry["unread_count"] == 2
    [alice_entry] = (await alice.client.list_sessions())["sessions"]
    assert alice_entry["unread_count"] == 1


async def test_list_agent_session_names_the_agent_and_filters(users: Users) -> None:
    alice = users("alice")
    agent_sid = (await alice.client.create_session(agent_id=1, title="bot"))["session_id"]
    group_sid = (await alice.client.create_session(title="people"))["session_id"]

    everything = await alice.client.list_sessions()
    by_id = {s["session_id"]: s for s in everything["sessions"]}
    assert by_id[agent_sid]["agent_name"] == "Demo"
    assert by_id[agent_sid]["agent_id"] == 1
    assert by_id[group_sid]["agent_name"] is None

    only_agent = await alice.client.list_sessions(agent_id=1)
    assert [s["session_id"] for s in only_agent["sessions"]] == [agent_sid]
    assert only_agent["total"] == 1


async def test_detail_shape(users: Users) -> None:
    alice, bob = users("alice"), users("bob")
    sid = (await alice.client.create_session(agent_id=1, title="Support", metadata={"p": "high"}))[
        "session_id"
    ]
    detail = await alice.client.get_session(sid)
    assert detail["session_id"] == sid
    assert detail["trace_id"].startswith("trace_")
    assert detail["user_id"] == alice.id
    assert detail["agent_id"] == 1
    assert detail["agent"] == {"id": 1, "name": "Demo", "avatar_url": None}
    assert detail["title"] == "Support"
    assert detail["status"] == "active"
    assert detail["metadata"] == {"p": "high"}
    assert detail["participants"] == [alice.id]
    assert detail["message_count"] == 0
    created = parse_time(detail["created_at"])
    parse_time(detail["last_activity"])

    await alice.client.send_message(sid, "one")
    await alice.client.send_message(sid, "two")
    later = await alice.client.get_session(sid)
    assert later["message_count"] == 2
    assert parse_time(later["last_activity"]) >= created

    group = (await alice.client.create_session(title="g", participants=[bob.id]))["session_id"]
    group_detail = await bob.client.get_session(group)
    assert group_detail["agent"] is None
    assert sorted(group_detail["participants"]) == sorted([alice.id, bob.id])


async def test_delete_answers_a2g_body_then_session_is_gone(
    server: ServerProcess, http: httpx.AsyncClient, users: Users
) -> None:
    alice, bob = users("alice"), users("bob")
    sid = (await alice.client.create_session(title="bye", participants=[bob.id]))["session_id"]
    await alice.client.send_message(sid, "hello")

    response = await http.delete(f"{API}/sessions/{sid}", headers=alice.headers)
    assert response.status_code == 200, response.text
    assert response.json() == {"message": "Session archived successfully", "session_id": sid}

    for who in (alice, bob):
        for method, path, body in (
            ("GET", f"{API}/sessions/{sid}", None),
            ("GET", f"{API}/sessions/{sid}/messages", None),
            ("POST", f"{API}/sessions/{sid}/messages", {"content": "anyone?"}),
            ("POST", f"{API}/sessions/{sid}/read", {"seq": 1}),
            ("POST", f"{API}/sessions/{sid}/end", None),
            ("DELETE", f"{API}/sessions/{sid}", None),
        ):
            gone = await http.request(method, path, headers=who.headers, json=body)
            assert gone.status_code == 404, (method, path, gone.text)
            assert gone.json()["error"]["code"] in ("NOT_FOUND", "SESSION_NOT_FOUND")
        listed = await who.client.list_sessions()
        assert sid not in [s["session_id"] for s in listed["sessions"]]
        archived = await who.client.list_sessions(status="archived")
        assert sid not in [s["session_id"] for s in archived["sessions"]]

    ws = await ws_connect(server, sid, alice.token)
    try:
        assert await close_code(ws) == 4404
    finally:
        await ws.close()


async def test_only_the_owner_deletes(users: Users) -> None:
    alice, bob = users("alice"), users("bob")
    sid = (await alice.client.create_session(title="mine", participants=[bob.id]))["session_id"]
    with pytest.raises(ChatAPIError) as err:
        await bob.client.delete_session(sid)
    assert err.value.status == 403
    assert (await alice.client.get_session(sid))["status"] == "active"


async def test_end_archives_with_ended_at_and_duration(users: Users) -> None:
    alice, bob = users("alice"), users("bob")
    sid = (await alice.client.create_session(title="call", participants=[bob.id]))["session_id"]
    await alice.client.send_message(sid, "starting")
    await asyncio.sleep(1.1)
    ended = await alice.client.end_session(sid)
    assert ended["session_id"] == sid
    assert ended["status"] == "archived"
    ended_at = parse_time(ended["ended_at"])
    assert isinstance(ended["duration_seconds"], int)
    assert 1 <= ended["duration_seconds"] < 60

    detail = await bob.client.get_session(sid)
    assert detail["status"] == "archived"
    assert parse_time(detail["ended_at"]) == ended_at

    # Still listed, under status=archived and not under active.
    archived = await alice.client.list_sessions(status="archived")
    assert sid in [s["session_id"] for s in archived["sessions"]]
    active = await alice.client.list_sessions(status="active")
    assert sid not in [s["session_id"] for s in active["sessions"]]

    # Read-only now, and ending again changes nothing.
    with pytest.raises(ChatAPIError) as err:
        await bob.client.send_message(sid, "too late")
    assert err.value.status == 409
    again = await alice.client.end_session(sid)
    assert again["status"] == "archived"
    assert parse_time(again["ended_at"]) == ended_at
    history = await alice.client.history(sid)
    assert [m["content"] for m in history] == ["starting"]


async def test_scheduled_session_becomes_active_on_the_first_message(users: Users) -> None:
    alice, bob = users("alice"), users("bob")
    later = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    created = await alice.client.create_session(
        title="consultation", participants=[bob.id], scheduled_at=later
    )
    sid = created["session_id"]
    assert created["status"] == "scheduled"
    assert created["started_at"] is None
    scheduled = await bob.client.list_sessions(status="scheduled")
    assert [s["session_id"] for s in scheduled["sessions"]] == [sid]

    sent = await bob.client.send_message(sid, "I'm early")
    detail = await alice.client.get_session(sid)
    assert detail["status"] == "active"
    # The same statement reads PostgreSQL's clock for both (clock_timestamp(), after the
    # row lock, so times follow seq order); two readings may differ by a microsecond.
    started = datetime.fromisoformat(detail["started_at"].replace("Z", "+00:00"))
    first = datetime.fromisoformat(sent["created_at"].replace("Z", "+00:00"))
    assert abs(started - first) < timedelta(milliseconds=1), (started, first)
    assert (await bob.client.list_sessions(status="scheduled"))["total"] == 0

    # A scheduled time in the past is simply an active session.
    past = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    assert (await alice.client.create_session(title="p", scheduled_at=past))["status"] == "active"


async def test_list_puts_the_most_recent_activity_first(users: Users) -> None:
    alice = users("alice")
    first = (await alice.client.create_session(title="first"))["session_id"]
    second = (await alice.client.create_session(title="second"))["session_id"]
    listed = await alice.client.list_sessions()
    assert [s["session_id"] for s in listed["sessions"]] == [second, first]
    sent = await alice.client.send_message(first, "bump")
    listed = await alice.client.list_sessions()
    assert [s["session_id"] for s in listed["sessions"]] == [first, second]
    assert listed["sessions"][0]["last_message_at"] == sent["created_at"]
    assert listed["sessions"][1]["last_message"] is None
    assert listed["sessions"][1]["last_message_at"] is None


async def test_who_may_end_a_session(users: Users) -> None:
    alice, bob = users("alice"), users("bob")
    group = (await alice.client.create_session(title="g", participants=[bob.id]))["session_id"]
    with pytest.raises(ChatAPIError) as err:
        await bob.client.end_session(group)
    assert err.value.status == 403
    assert (await alice.client.get_session(group))["status"] == "active"
    # In a direct conversation either side may end it.
    direct = (await alice.client.create_session(kind="direct", participants=[bob.id]))["session_id"]
    assert (await bob.client.end_session(direct))["status"] == "archived"
    # An archived session can still be deleted by its owner.
    await alice.client.delete_session(direct)
    with pytest.raises(ChatAPIError) as err:
        await alice.client.get_session(direct)
    assert err.value.status == 404
