"""AI agents end to end, on one real `serve` process per database, with real clients
(the SDK, raw `websockets`, `httpx` reading SSE) and the built-in demo agent.

Covers: the demo agent out of the box, the agent registry, an answer reaching every
device, the SSE send-and-stream of the A2G-compatible REST contract, resume over SSE and
over a WS reconnect, cancel over REST and over a WS frame from another device, and answers
outliving their client.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import websockets

from chatservice.agents.base import AgentRequest, Turn
from chatservice.agents.demo import demo_answer
from chatservice.auth import TokenCodec
from chatservice.domain import Agent
from tests.conftest import BACKENDS, ServerProcess, start_server
from tests.e2e.agent_helpers import (
    API,
    Answer,
    People,
    Person,
    SSEReader,
    assert_complete,
    device,
    raw_reader,
    read_answer,
    sdk_reader,
    stored_answer,
    wait_stored,
)
from tests.e2e.conftest import bearer, frames_until_pong, recv_json

CHUNK = 10
DELAY_MS = 25
# The demo answer quotes the question: this one makes it ~55 chunks (~1.4 s) long.
LONG = "please take your time with this one " * 10


def expected_demo(question: str, earlier: int = 0) -> str:
    turns = [Turn("user", f"earlier {i}") for i in range(earlier)] + [Turn("user", question)]
    return demo_answer(AgentRequest(agent=Agent(1, "Demo", None, "demo"), settings={}, turns=turns))


@pytest.fixture(scope="module", params=BACKENDS)
def agent_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    url = None if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    proc = start_server(
        tmp_path_factory.mktemp(f"agents-{request.param}"),
        url,
        STREAM_CHUNK_SIZE=CHUNK,
        STREAM_DELAY_MS=DELAY_MS,
    )
    yield proc
    proc.stop()


@pytest.fixture
async def people(agent_server: ServerProcess, tokens: TokenCodec) -> AsyncIterator[People]:
    made = People(agent_server, tokens)
    yield made
    await made.aclose()


async def demo_session(person: Person, title: str = "ask the demo") -> str:
    body = await person.client.create_session(agent_id=1, title=title)
    assert body["kind"] == "agent" and body["agent_id"] == 1
    return str(body["session_id"])


# -- out of the box, and the registry -----------------------------------------------------------


async def test_the_first_serve_chats_with_the_demo_agent(
    tmp_path: Path, tokens: TokenCodec
) -> None:
    server = start_server(tmp_path / "fresh")  # nothing configured: the defaults
    people = People(server, tokens)
    try:
        alice = people("alice")
        listed = (await alice.http.get(f"{API}/agents")).json()["agents"]
        assert [(a["id"], a["name"], a["backend"]) for a in listed] == [(1, "Demo", "demo")]
        sid = await demo_session(alice, "first chat")
        sessions = (await alice.client.list_sessions())["sessions"]
        assert [(s["session_id"], s["agent_id"], s["agent_name"]) for s in sessions] == [
            (sid, 1, "Demo")
        ]
        detail = await alice.client.get_session(sid)
        assert detail["agent"] == {"id": 1, "name": "Demo", "avatar_url": None}

        async with alice.client.realtime(sid) as live:
            await live.send_message("Hello there!")
            answer = await read_answer(sdk_reader(live))
        assert_complete(answer)
        assert answer.text == expected_demo("Hello there!")
        stored = await stored_answer(alice, sid, answer.message_id)
        assert stored["message_type"] == "stream" and stored["sender_type"] == "agent"
        sessions = (await alice.client.list_sessions())["sessions"]
        assert sessions[0]["last_message"] is not None
    finally:
        await people.aclose()
        server.stop()


async def test_the_agent_registry_over_http(people: People) -> None:
    user, admin = people("plain"), people("admin", roles=["admin"])
    listed = await user.http.get(f"{API}/agents")
    assert listed.status_code == 200
    demo = next(a for a in listed.json()["agents"] if a["id"] == 1)
    assert (demo["name"], demo["avatar_url"], demo["backend"]) == ("Demo", None, "demo")

    body = {
        "name": "Librarian",
        "avatar_url": "https://example.test/lib.png",
        "backend": "openai",
        "settings": {"model": "some-model", "api_key": "sk-very-secret", "temperature": 0.1},
    }
    refused = await user.http.post(f"{API}/agents", json=body)
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"]["code"] == "FORBIDDEN"
    async with httpx.AsyncClient(base_url=str(user.http.base_url)) as nobody:
        anonymous = await nobody.post(f"{API}/agents", json=body)
    assert anonymous.status_code == 401

    created = await admin.http.post(f"{API}/agents", json=body)
    assert created.status_code == 201, created.text
    agent = created.json()
    assert (agent["name"], agent["avatar_url"], agent["backend"]) == (
        "Librarian",
        "https://example.test/lib.png",
        "openai",
    )
    assert agent["settings"] == {"model": "some-model", "temperature": 0.1}
    assert "sk-very-secret" not in created.text
    again = await user.http.get(f"{API}/agents")
    assert "sk-very-secret" not in again.text
    assert agent["id"] in [a["id"] for a in again.json()["agents"]]

    for bad in ({**body, "backend": "skynet"}, {**body, "name": ""}, {"backend": "demo"}):
        response = await admin.http.post(f"{API}/agents", json=bad)
        assert response.status_code == 422, (bad, response.text)
        assert "error" in response.json()

    # A session with the new agent shows it as the A2G-compatible REST contract does.
    sid = (await user.client.create_session(agent_id=agent["id"]))["session_id"]
    detail = await user.client.get_session(sid)
    assert detail["agent"] == {
        "id": agent["id"],
        "name": "Librarian",
        "avatar_url": "https://example.test/lib.png",
    }
    listed_sessions = (await user.client.list_sessions(agent_id=agent["id"]))["sessions"]
    assert [s["agent_name"] for s in listed_sessions] == ["Librarian"]


# -- every device gets the answer ----------------------------------------------------------------


async def test_two_devices_of_one_user_both_receive_the_stream(
    agent_server: ServerProcess, people: People
) -> None:
    alice = people("alice")
    sid = await demo_session(alice)
    phone = await device(agent_server, sid, alice.token)
    try:
        async with alice.client.realtime(sid) as laptop:
            await frames_until_pong(phone)
            await laptop.ping()
            await laptop.receive_until("pong", 5)
            question = "two devices, one answer"
            sent = await alice.client.send_message(sid, question)
            on_phone, on_laptop = await asyncio.gather(
                read_answer(raw_reader(phone)), read_answer(sdk_reader(laptop))
            )
    finally:
        await phone.close()
    for answer in (on_phone, on_laptop):
        end = assert_complete(answer)
        assert answer.start is not None and answer.start["reply_to"] == sent["message_id"]
        assert answer.text == expected_demo(question)
        assert len(answer.chunks) == math.ceil(len(answer.text) / CHUNK)
        assert end["seq"] == sent["seq"] + 1
        assert not answer.errors
        # The question came first, as a message frame.
        assert [f["message_id"] for f in answer.others if f["type"] == "message"] == [
            sent["message_id"]
        ]
    assert on_phone.chunks == on_laptop.chunks
    assert on_phone.end == on_laptop.end

    phone_end = assert_complete(on_phone)
    stored = await stored_answer(alice, sid, on_phone.message_id)
    assert stored["message_type"] == "stream"
    assert stored["content"] == on_phone.text
    assert stored["seq"] == phone_end["seq"]
    meta = stored["metadata"]
    assert meta["status"] == "completed"
    assert meta["chunks"] == len(on_phone.chunks)
    assert meta["tokens_used"] == phone_end["tokens_used"]
    assert meta["latency_ms"] == phone_end["latency_ms"]
    # One stored answer, no chunk rows, no extra `message` frame after stream_end.
    history = await alice.client.history(sid)
    assert [m["message_type"] for m in history] == ["text", "stream"]


# -- SSE ---------------------------------------------------------------------------------------


A2G_SSE = re.compile(r"(data: \{[^\n]*\}\n\n)+")


async def test_send_and_stream_answers_sse_in_the_a2g_shape(people: People) -> None:
    alice = people("alice")
    sid = await demo_session(alice)
    question = "긴 설명이 필요한 질문입니다."
    response = await alice.http.post(
        f"{API}/sessions/{sid}/messages/stream",
        json={"content": question, "stream": True},
        timeout=20,
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    body = response.text
    assert A2G_SSE.fullmatch(body), body[:300]
    frames = [json.loads(line[len("data: ") :]) for line in body.split("\n") if line]
    kinds = [f["type"] for f in frames]
    assert kinds[0] == "stream_start" and kinds[-1] == "stream_end"
    assert set(kinds[1:-1]) == {"stream_chunk"}, kinds
    start, chunks, end = frames[0], frames[1:-1], frames[-1]
    assert start["message_id"].startswith("msg_")
    assert [c["index"] for c in chunks] == list(range(len(chunks)))
    assert all(c["message_id"] == start["message_id"] for c in chunks)
    text = "".join(c["content"] for c in chunks)
    assert text == expected_demo(question)
    assert end["message_id"] == start["message_id"]
    assert isinstance(end["tokens_used"], int) and end["tokens_used"] > 0
    assert isinstance(end["latency_ms"], int) and end["latency_ms"] >= (len(chunks) - 1) * 20
    assert end["status"] == "completed"

    history = await alice.client.history(sid)
    assert [(m["message_type"], m["content"]) for m in history] == [
        ("text", question),
        ("stream", text),
    ]
    assert history[1]["message_id"] == start["message_id"]
    assert history[1]["seq"] == end["seq"]


async def test_send_and_stream_waits_its_turn_behind_an_answer_in_progress(
    agent_server: ServerProcess, people: People
) -> None:
    alice = people("alice")
    sid = await demo_session(alice)
    ws = await device(agent_server, sid, alice.token)
    try:
        await frames_until_pong(ws)
        await alice.client.send_message(sid, LONG)
        first = await read_answer(raw_reader(ws), until_chunks=2)
        response = await alice.http.post(
            f"{API}/sessions/{sid}/messages/stream", json={"content": "me next"}, timeout=20
        )
        first = await read_answer(raw_reader(ws), answer=first)
    finally:
        await ws.close()
    assert response.status_code == 200
    frames = [json.loads(line[len("data: ") :]) for line in response.text.split("\n") if line]
    assert frames[0]["type"] == "stream_start" and frames[-1]["type"] == "stream_end"
    assert frames[0]["message_id"] != first.message_id, "the SSE streamed someone else's answer"
    text = "".join(f["content"] for f in frames if f["type"] == "stream_chunk")
    assert text == expected_demo("me next", earlier=1)
    first_end = assert_complete(first)
    assert first_end["seq"] < frames[-1]["seq"]  # queued: answered after the first


async def test_send_and_stream_refusals(agent_server: ServerProcess, people: People) -> None:
    alice, bob = people("alice"), people("bob")
    sid = await demo_session(alice)
    group = (await alice.client.create_session(title="people only"))["session_id"]
    url = f"{API}/sessions/{{}}/messages/stream"
    cases = [
        (bob, sid, {"content": "let me in"}, 403),
        (alice, group, {"content": "no agent here"}, 422),
        (alice, sid, {"content": ""}, 422),
        (alice, sid, {}, 422),
        (alice, "sess_does_not_exist", {"content": "hello"}, 404),
    ]
    for who, session, payload, status in cases:
        response = await who.http.post(url.format(session), json=payload)
        assert response.status_code == status, (payload, response.text)
        assert "error" in response.json()
    async with httpx.AsyncClient(base_url=agent_server.base_url) as nobody:
        anonymous = await nobody.post(url.format(sid), json={"content": "hi"})
    assert anonymous.status_code == 401
    assert await alice.client.history(sid) == []
    assert await alice.client.history(group) == []


async def test_resume_over_sse_from_an_index_mid_answer_then_after_the_end(
    agent_server: ServerProcess, people: People
) -> None:
    alice = people("alice")
    sid = await demo_session(alice)
    ws = await device(agent_server, sid, alice.token)
    try:
        await frames_until_pong(ws)
        await alice.client.send_message(sid, LONG)
        seen = await read_answer(raw_reader(ws), until_chunks=8)
        stream_id = seen.message_id
        async with alice.http.stream(
            "GET", f"{API}/streams/{stream_id}", params={"from_index": 5}, timeout=20
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            resumed = await SSEReader(response).rest()
        seen = await read_answer(raw_reader(ws), answer=seen)
    finally:
        await ws.close()
    seen_end = assert_complete(seen)
    assert resumed[0]["type"] == "stream_start" and resumed[0]["message_id"] == stream_id
    assert resumed[-1]["type"] == "stream_end"
    chunks = [e for e in resumed if e["type"] == "stream_chunk"]
    assert len(chunks) == len(resumed) - 2, [e["type"] for e in resumed]
    assert [c["index"] for c in chunks] == list(range(5, len(seen.chunks))), "gap or repeat"
    assert [c["content"] for c in chunks] == [c["content"] for c in seen.chunks[5:]]
    assert resumed[-1]["status"] == "completed"
    assert resumed[-1]["seq"] == seen_end["seq"]
    assert resumed[-1]["tokens_used"] == seen_end["tokens_used"]

    # Over: the stored message, as one `message` event, and the response ends.
    async with alice.http.stream(
        "GET", f"{API}/streams/{stream_id}", params={"from_index": 3}, timeout=10
    ) as response:
        assert response.status_code == 200
        events_after = await SSEReader(response).rest(timeout=5)
    assert len(events_after) == 1, events_after
    (message,) = events_after
    assert message["type"] == "message"
    assert message["message_id"] == stream_id
    assert message["message_type"] == "stream"
    assert message["content"] == seen.text == expected_demo(LONG)
    assert message["metadata"]["status"] == "completed"


async def test_resume_and_cancel_refusals(agent_server: ServerProcess, people: People) -> None:
    alice, mallory = people("alice"), people("mallory")
    sid = await demo_session(alice)
    ws = await device(agent_server, sid, alice.token)
    try:
        await frames_until_pong(ws)
        sent = await alice.client.send_message(sid, LONG)
        seen = await read_answer(raw_reader(ws), until_chunks=2)
        stream_id = seen.message_id
        for from_index in ("-1", "abc", "1.5"):
            bad = await alice.http.get(
                f"{API}/streams/{stream_id}", params={"from_index": from_index}
            )
            assert bad.status_code == 422, (from_index, bad.text)
            assert "error" in bad.json()
        for response in (
            await mallory.http.get(f"{API}/streams/{stream_id}"),
            await mallory.http.post(f"{API}/streams/{stream_id}/cancel"),
        ):
            assert response.status_code == 403, response.text
            assert response.json()["error"]["code"] == "FORBIDDEN"
        for response in (
            await alice.http.get(f"{API}/streams/msg_nope"),
            await alice.http.post(f"{API}/streams/msg_nope/cancel"),
            await alice.http.get(f"{API}/streams/{sent['message_id']}"),  # not a stream
        ):
            assert response.status_code == 404, response.text
        async with httpx.AsyncClient(base_url=agent_server.base_url) as nobody:
            anonymous = await nobody.get(f"{API}/streams/{stream_id}")
        assert anonymous.status_code == 401
        seen = await read_answer(raw_reader(ws), answer=seen)
        assert_complete(seen)  # a refused cancel stops nothing
        after = await mallory.http.get(f"{API}/streams/{stream_id}")
        assert after.status_code == 403
    finally:
        await ws.close()


# -- WS reconnect ------------------------------------------------------------------------------


async def test_a_ws_reconnect_mid_answer_gets_the_answer_so_far_then_live(
    agent_server: ServerProcess, people: People
) -> None:
    alice = people("alice")
    sid = await demo_session(alice)
    ws = await device(agent_server, sid, alice.token)
    await frames_until_pong(ws)
    sent = await alice.client.send_message(sid, LONG)
    before = await read_answer(raw_reader(ws), until_chunks=6)
    await ws.close()
    await asyncio.sleep(0.3)  # the answer goes on meanwhile
    ws = await device(agent_server, sid, alice.token, since_seq=sent["seq"])
    try:
        connected = await recv_json(ws)
        assert connected["type"] == "connected"
        after = await read_answer(raw_reader(ws))
    finally:
        await ws.close()
    assert after.message_id == before.message_id
    assert_complete(after)  # indexes 0..n-1 exactly once: the start, so far, then live
    assert after.chunks[: len(before.chunks)] == before.chunks
    assert after.text == expected_demo(LONG)
    # since_seq covered the question: it is not sent again.
    assert not [f for f in after.others if f.get("type") == "message"]


async def test_a_ws_reconnect_after_the_answer_ended_gets_the_stored_answer(
    agent_server: ServerProcess, people: People
) -> None:
    alice = people("alice")
    sid = await demo_session(alice)
    ws = await device(agent_server, sid, alice.token)
    await frames_until_pong(ws)
    sent = await alice.client.send_message(sid, "short one")
    before = await read_answer(raw_reader(ws), until_chunks=2)
    await ws.close()
    stored = await wait_stored(alice, sid, before.message_id)
    ws = await device(agent_server, sid, alice.token, since_seq=sent["seq"])
    try:
        missed = await frames_until_pong(ws)
    finally:
        await ws.close()
    missed = [f for f in missed if f["type"] != "system"]  # presence: user_joined
    assert [f["type"] for f in missed] == ["connected", "message"], missed
    message = missed[1]
    assert (message["message_id"], message["seq"], message["message_type"]) == (
        before.message_id,
        stored["seq"],
        "stream",
    )
    assert message["content"] == expected_demo("short one")
    assert message["metadata"]["status"] == "completed"


async def test_the_sdk_reconnects_mid_answer_without_repeating_chunks(
    agent_server: ServerProcess, people: People
) -> None:
    alice = people("alice")
    sid = await demo_session(alice)
    async with alice.client.realtime(sid) as live:
        await live.ping()
        await live.receive_until("pong", 5)
        await alice.client.send_message(sid, LONG)
        answer = await read_answer(sdk_reader(live), until_chunks=5)
        # Drop the connection under the SDK, as a network failure would.
        await live._socket().close(code=1011, reason="network trouble")
        answer = await read_answer(sdk_reader(live), answer=answer)
        assert live.reconnects == 1
    assert_complete(answer)
    assert answer.text == expected_demo(LONG)


# -- cancel ------------------------------------------------------------------------------------


async def test_cancel_over_rest_ends_the_answer_everywhere(
    agent_server: ServerProcess, people: People
) -> None:
    alice = people("alice")
    sid = await demo_session(alice)
    phone = await device(agent_server, sid, alice.token)
    laptop = await device(agent_server, sid, alice.token)
    try:
        await frames_until_pong(phone)
        await frames_until_pong(laptop)
        await alice.client.send_message(sid, LONG)
        on_phone = await read_answer(raw_reader(phone), until_chunks=3)
        cancelled_at = time.monotonic()
        response = await alice.http.post(f"{API}/streams/{on_phone.message_id}/cancel")
        assert response.status_code == 202, response.text
        assert response.json() == {"message_id": on_phone.message_id, "status": "cancelling"}
        on_phone, on_laptop = await asyncio.gather(
            read_answer(raw_reader(phone), answer=on_phone, timeout=5),
            read_answer(raw_reader(laptop), timeout=5),
        )
        assert time.monotonic() - cancelled_at < 2
        again = await alice.http.post(f"{API}/streams/{on_phone.message_id}/cancel")
        assert again.status_code == 200
        assert again.json() == {"message_id": on_phone.message_id, "status": "cancelled"}
        # The session goes on.
        await alice.client.send_message(sid, "and now?")
        for ws in (phone, laptop):
            next_answer = await read_answer(raw_reader(ws))
            assert_complete(next_answer)
            assert next_answer.text == expected_demo("and now?", earlier=1)
    finally:
        await phone.close()
        await laptop.close()
    await check_cancelled(alice, sid, on_phone, on_laptop)


async def test_cancel_from_a_second_device_over_ws(
    agent_server: ServerProcess, people: People
) -> None:
    alice, bob = people("alice"), people("bob")
    sid = await demo_session(alice)
    elsewhere = await demo_session(bob)  # alice takes no part in it
    phone = await device(agent_server, sid, alice.token)
    try:
        async with alice.client.realtime(sid) as laptop:
            await frames_until_pong(phone)
            await alice.client.send_message(sid, LONG)
            on_phone = await read_answer(raw_reader(phone), until_chunks=4)
            on_laptop = await read_answer(sdk_reader(laptop), until_chunks=1)
            bob_ws = await device(agent_server, elsewhere, bob.token)
            try:
                await frames_until_pong(bob_ws)
                await bob.client.send_message(elsewhere, LONG)
                bobs = await read_answer(raw_reader(bob_ws), until_chunks=1)
                # Alice cannot stop bob's answer through her own session's socket.
                await laptop.send_frame({"type": "cancel", "message_id": bobs.message_id})
                on_laptop = await read_answer(
                    sdk_reader(laptop), answer=on_laptop, until_other="error", timeout=5
                )
                refusal = on_laptop.others[-1]
                assert refusal["type"] == "error" and refusal["code"] == "FORBIDDEN", refusal
                await laptop.send_frame({"type": "cancel", "message_id": on_phone.message_id})
                on_phone, on_laptop = await asyncio.gather(
                    read_answer(raw_reader(phone), answer=on_phone, timeout=5),
                    read_answer(sdk_reader(laptop), answer=on_laptop, timeout=5),
                )
                bobs = await read_answer(raw_reader(bob_ws), answer=bobs)
                assert_complete(bobs)
            finally:
                await bob_ws.close()
            # The connection that sent the frames still works.
            await laptop.ping()
            await laptop.receive_until("pong", 5)
    finally:
        await phone.close()
    await check_cancelled(alice, sid, on_phone, on_laptop)


async def check_cancelled(person: Person, session_id: str, *answers: Answer) -> None:
    first = answers[0]
    for answer in answers:
        end = assert_complete(answer, "cancelled")
        assert answer.message_id == first.message_id
        assert end == first.end
        assert not answer.errors, "a cancel is not an error"
    full = expected_demo(LONG)
    assert 3 <= len(first.chunks) < math.ceil(len(full) / CHUNK), "it was not stopped"
    assert full.startswith(first.text)
    stored = await stored_answer(person, session_id, first.message_id)
    assert stored["message_type"] == "stream"
    assert stored["content"] == first.text
    assert stored["metadata"]["status"] == "cancelled"
    assert stored["metadata"]["chunks"] == len(first.chunks)


# -- answers outlive their client --------------------------------------------------------------


async def test_an_sse_client_that_leaves_does_not_stop_the_answer(people: People) -> None:
    alice = people("alice")
    sid = await demo_session(alice)
    async with alice.http.stream(
        "POST", f"{API}/sessions/{sid}/messages/stream", json={"content": LONG}, timeout=10
    ) as response:
        assert response.status_code == 200
        reader = SSEReader(response)
        start = await reader.next()
        assert start is not None and start["type"] == "stream_start"
        for _ in range(3):
            chunk = await reader.next()
            assert chunk is not None and chunk["type"] == "stream_chunk"
    # The response is closed: the client is gone.
    stored = await wait_stored(alice, sid, start["message_id"])
    assert stored["metadata"]["status"] == "completed"
    assert stored["content"] == expected_demo(LONG)


async def test_a_ws_client_that_leaves_does_not_stop_the_answer(
    agent_server: ServerProcess, people: People
) -> None:
    alice = people("alice")
    sid = await demo_session(alice)
    async with websockets.connect(
        f"{agent_server.ws_url}/ws/{sid}?token={alice.token}", max_queue=4096, close_timeout=2
    ) as ws:
        await frames_until_pong(ws)
        await ws.send(json.dumps({"type": "message", "content": LONG}))
        answer = await read_answer(raw_reader(ws), until_chunks=2)
    stored = await wait_stored(alice, sid, answer.message_id)
    assert stored["metadata"]["status"] == "completed"
    assert stored["content"] == expected_demo(LONG)
    # And a later resume gets all of it.
    response = await alice.http.get(
        f"{API}/streams/{answer.message_id}", headers=bearer(alice.token)
    )
    assert response.status_code == 200
    assert json.loads(response.text.strip()[len("data: ") :])["content"] == expected_demo(LONG)


async def test_a_retried_send_and_stream_does_not_hang(people: People) -> None:
    """A client whose connection dropped retries its POST …/messages/stream with the same
    client_msg_id (that is what the id is for). The message is not stored twice and no
    second answer is made; the retry must still end promptly with the answer (streamed
    or stored), not hang until the idle timeout."""
    alice = people("alice")
    sid = await demo_session(alice)
    payload = {"content": "retry me", "client_msg_id": "retry-1"}
    url = f"{API}/sessions/{sid}/messages/stream"
    first = await alice.http.post(url, json=payload, timeout=20)
    assert first.status_code == 200
    assert '"stream_end"' in first.text
    try:
        retried = await asyncio.wait_for(alice.http.post(url, json=payload, timeout=30), 8)
    except TimeoutError:
        pytest.fail("the retried send-and-stream hung (no answer frames within 8 s)")
    assert retried.status_code == 200
    frames = [json.loads(line[len("data: ") :]) for line in retried.text.split("\n") if line]
    assert frames, "the retry answered nothing"
    if frames[-1]["type"] == "message":  # the stored answer
        assert frames[-1]["message_type"] == "stream"
        assert frames[-1]["content"] == expected_demo("retry me")
    else:  # or the answer streamed again from the buffer
        assert frames[-1]["type"] == "stream_end", frames
        chunks = [f["content"] for f in frames if f["type"] == "stream_chunk"]
        assert "".join(chunks) == expected_demo("retry me")
    history = await alice.client.history(sid)
    assert [m["message_type"] for m in history] == ["text", "stream"]
