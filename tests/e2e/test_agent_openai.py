"""The `openai` backend end to end: a real `serve` process whose agents talk, through
the official SDK, to the fake OpenAI-compatible server of `tests/fakes` (real HTTP).

Covers: usage → tokens_used, the context sent upstream (system prompt, recent messages,
model, temperature, key), OPENAI_* defaults, upstream HTTP errors, a malformed chunk, a
stall hitting AGENT_STALL_TIMEOUT, and a cancel from another device closing the upstream
request.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from chatservice.agents.context import DEFAULT_SYSTEM_PROMPT
from chatservice.auth import TokenCodec
from tests.conftest import ServerProcess, new_user, start_server
from tests.e2e.agent_helpers import (
    API,
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
from tests.e2e.conftest import frames_until_pong
from tests.fakes.openai_server import (
    FakeOpenAI,
    answer_text,
    piece,
    running_fake,
    wait_until,
)

JSON = dict[str, Any]
ENV_KEY = "sk-env-" + new_user("k")
AGENT_KEY = "sk-agent-" + new_user("k")
STALL_TIMEOUT = 1


@pytest.fixture(scope="module")
def fake_openai() -> Iterator[FakeOpenAI]:
    with running_fake() as fake:
        yield fake


@pytest.fixture(scope="module")
def openai_server(
    fake_openai: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    proc = start_server(
        tmp_path_factory.mktemp("agents-openai"),
        OPENAI_BASE_URL=fake_openai.base_url,
        OPENAI_API_KEY=ENV_KEY,
        OPENAI_MODEL="env-default-model",
        AGENT_STALL_TIMEOUT=STALL_TIMEOUT,
        AGENT_TIMEOUT=20,
    )
    yield proc
    proc.stop()


@pytest.fixture
async def people(openai_server: ServerProcess, tokens: TokenCodec) -> AsyncIterator[People]:
    made = People(openai_server, tokens)
    yield made
    await made.aclose()


async def new_agent(people: People, **settings: Any) -> int:
    admin = people("admin", roles=["admin"])
    response = await admin.http.post(
        f"{API}/agents",
        json={"name": "Fake GPT", "backend": "openai", "settings": settings},
    )
    assert response.status_code == 201, response.text
    assert AGENT_KEY not in response.text
    return int(response.json()["id"])


async def fake_agent(people: People, fake: FakeOpenAI, **settings: Any) -> int:
    return await new_agent(
        people,
        base_url=fake.base_url,
        api_key=AGENT_KEY,
        model="fake-model-1",
        **settings,
    )


async def session_with(person: Person, agent_id: int) -> str:
    body = await person.client.create_session(agent_id=agent_id, title="model chat")
    return str(body["session_id"])


async def test_an_openai_agent_answers_with_its_context_and_usage(
    openai_server: ServerProcess, people: People, fake_openai: FakeOpenAI
) -> None:
    agent_id = await fake_agent(
        people, fake_openai, system_prompt="You are the test oracle.", temperature=0.3
    )
    alice = people("alice")
    sid = await session_with(alice, agent_id)
    tag = new_user("ctx")
    first, second = f"{tag} first", f"{tag} second fake:chunks=5"
    ws = await device(openai_server, sid, alice.token)
    try:
        await frames_until_pong(ws)
        await alice.client.send_message(sid, first)
        one = await read_answer(raw_reader(ws))
        await alice.client.send_message(sid, second)
        two = await read_answer(raw_reader(ws))
    finally:
        await ws.close()

    for answer, pieces in ((one, 3), (two, 5)):
        end = assert_complete(answer)
        assert [c["content"] for c in answer.chunks] == [piece(i) for i in range(pieces)]
        assert answer.start is not None and answer.start["sender_id"] == str(agent_id)
        assert end["chunks"] == pieces
    record_one = fake_openai.find(first)[0]
    record_two = fake_openai.find(second)[0]
    assert one.end is not None and two.end is not None
    assert one.end["tokens_used"] == record_one.usage_total
    assert two.end["tokens_used"] == record_two.usage_total
    assert record_two.usage_total is not None and record_two.usage_total > 5

    assert record_two.model == "fake-model-1"
    assert record_two.temperature == 0.3
    assert record_two.authorization == f"Bearer {AGENT_KEY}"
    assert record_two.body["stream"] is True
    assert record_two.messages == [
        {"role": "system", "content": "You are the test oracle."},
        {"role": "user", "content": first},
        {"role": "assistant", "content": answer_text(3)},
        {"role": "user", "content": second},
    ]
    stored = await stored_answer(alice, sid, two.message_id)
    assert stored["content"] == answer_text(5)
    assert stored["metadata"]["tokens_used"] == record_two.usage_total
    assert stored["metadata"]["status"] == "completed"


async def test_an_agent_without_settings_uses_the_openai_defaults(
    openai_server: ServerProcess, people: People, fake_openai: FakeOpenAI
) -> None:
    agent_id = await new_agent(people)  # base URL, key and model from OPENAI_*
    alice = people("alice")
    sid = await session_with(alice, agent_id)
    tag = new_user("defaults")
    async with alice.client.realtime(sid) as live:
        await live.send_message(f"{tag} fake:usage=31337")
        answer = await read_answer(sdk_reader(live))
    end = assert_complete(answer)
    assert end["tokens_used"] == 31337
    record = fake_openai.find(tag)[0]
    assert record.model == "env-default-model"
    assert record.authorization == f"Bearer {ENV_KEY}"
    assert record.temperature is None
    assert record.messages[0] == {"role": "system", "content": DEFAULT_SYSTEM_PROMPT}


async def test_send_and_stream_sse_with_an_openai_agent(
    people: People, fake_openai: FakeOpenAI
) -> None:
    agent_id = await fake_agent(people, fake_openai)
    alice = people("alice")
    sid = await session_with(alice, agent_id)
    tag = new_user("sse")
    response = await alice.http.post(
        f"{API}/sessions/{sid}/messages/stream",
        json={"content": f"{tag} fake:chunks=6 fake:delay_ms=10 fake:usage=99"},
        timeout=20,
    )
    assert response.status_code == 200, response.text
    frames = [
        json.loads(line[len("data: ") :])
        for line in response.text.split("\n")
        if line.startswith("data: ")
    ]
    assert [f["type"] for f in frames] == ["stream_start"] + ["stream_chunk"] * 6 + ["stream_end"]
    assert [f["index"] for f in frames[1:-1]] == list(range(6))
    assert "".join(f["content"] for f in frames[1:-1]) == answer_text(6)
    assert frames[-1]["tokens_used"] == 99 == fake_openai.find(tag)[0].usage_total
    assert frames[-1]["status"] == "completed"


@pytest.mark.parametrize(
    ("script", "partial"),
    [
        ("fake:status=500", 0),
        ("fake:status=401", 0),
        ("fake:chunks=6 fake:malformed_at=3", 3),
    ],
    ids=["http-500", "http-401", "malformed-chunk"],
)
async def test_an_upstream_failure_sends_an_error_and_ends_the_stream(
    openai_server: ServerProcess,
    people: People,
    fake_openai: FakeOpenAI,
    script: str,
    partial: int,
) -> None:
    agent_id = await fake_agent(people, fake_openai)
    alice = people("alice")
    sid = await session_with(alice, agent_id)
    tag = new_user("fail")
    ws = await device(openai_server, sid, alice.token)
    try:
        await frames_until_pong(ws)
        begun = time.monotonic()
        await alice.client.send_message(sid, f"{tag} {script}")
        failed = await read_answer(raw_reader(ws), timeout=10)
        assert time.monotonic() - begun < 5
        await alice.client.send_message(sid, f"{tag} and now?")
        after = await read_answer(raw_reader(ws))
    finally:
        await ws.close()
    end = assert_complete(failed, "error")
    (error,) = failed.errors
    assert error["type"] == "error" and error["code"] == "AGENT_ERROR"
    assert error["message_id"] == failed.message_id and error["message"]
    assert [c["content"] for c in failed.chunks] == [piece(i) for i in range(partial)]
    assert end["chunks"] == partial
    stored = await stored_answer(alice, sid, failed.message_id)
    assert stored["metadata"]["status"] == "error"
    assert stored["content"] == answer_text(partial)
    # The session stays usable.
    assert_complete(after)
    assert after.text == answer_text(3)


async def test_an_upstream_failure_over_sse(people: People, fake_openai: FakeOpenAI) -> None:
    agent_id = await fake_agent(people, fake_openai)
    alice = people("alice")
    sid = await session_with(alice, agent_id)
    response = await alice.http.post(
        f"{API}/sessions/{sid}/messages/stream",
        json={"content": f"{new_user('ssefail')} fake:chunks=4 fake:malformed_at=1"},
        timeout=20,
    )
    assert response.status_code == 200
    kinds = [
        json.loads(line[len("data: ") :])
        for line in response.text.split("\n")
        if line.startswith("data: ")
    ]
    assert [k["type"] for k in kinds] == ["stream_start", "stream_chunk", "error", "stream_end"]
    assert kinds[2]["code"] == "AGENT_ERROR"
    assert kinds[3]["status"] == "error"


async def test_an_upstream_stall_hits_the_stall_timeout(
    openai_server: ServerProcess, people: People, fake_openai: FakeOpenAI
) -> None:
    agent_id = await fake_agent(people, fake_openai)
    alice = people("alice")
    sid = await session_with(alice, agent_id)
    tag = new_user("stall")
    async with alice.client.realtime(sid) as live:
        await live.send_message(f"{tag} fake:chunks=6 fake:stall_after=2")
        answer = await read_answer(sdk_reader(live), until_chunks=2, timeout=10)
        stalled_at = time.monotonic()
        answer = await read_answer(sdk_reader(live), answer=answer, timeout=10)
        waited = time.monotonic() - stalled_at
    assert STALL_TIMEOUT * 0.8 < waited < STALL_TIMEOUT + 3, waited
    end = assert_complete(answer, "error")
    assert end["chunks"] == 2
    assert [e["code"] for e in answer.errors] == ["AGENT_ERROR"]
    record = fake_openai.find(tag)[0]
    await wait_until(lambda: record.disconnected, "the upstream request to close", 5)
    stored = await stored_answer(alice, sid, answer.message_id)
    assert stored["content"] == answer_text(2)
    assert stored["metadata"]["status"] == "error"


@pytest.mark.parametrize("via", ["ws-frame", "rest"])
async def test_a_cancel_from_another_device_closes_the_upstream_request(
    openai_server: ServerProcess, people: People, fake_openai: FakeOpenAI, via: str
) -> None:
    agent_id = await fake_agent(people, fake_openai)
    alice = people("alice")
    sid = await session_with(alice, agent_id)
    tag = new_user("cancel")
    phone = await device(openai_server, sid, alice.token)
    try:
        async with alice.client.realtime(sid) as laptop:
            await frames_until_pong(phone)
            await alice.client.send_message(sid, f"{tag} fake:chunks=400 fake:delay_ms=25")
            on_phone = await read_answer(raw_reader(phone), until_chunks=4)
            on_laptop = await read_answer(sdk_reader(laptop), until_chunks=1)
            cancelled_at = time.monotonic()
            if via == "rest":
                response = await alice.http.post(f"{API}/streams/{on_phone.message_id}/cancel")
                assert response.status_code == 202, response.text
            else:
                await laptop.send_frame({"type": "cancel", "message_id": on_phone.message_id})
            on_phone, on_laptop = await asyncio.gather(
                read_answer(raw_reader(phone), answer=on_phone, timeout=5),
                read_answer(sdk_reader(laptop), answer=on_laptop, timeout=5),
            )
    finally:
        await phone.close()
    record = fake_openai.find(tag)[0]
    await wait_until(lambda: record.disconnected, "the upstream request to close", 5)
    assert record.disconnected_at is not None
    assert record.disconnected_at - cancelled_at < 2.0, "the upstream request stayed open"
    assert record.pieces_sent < 400
    for answer in (on_phone, on_laptop):
        assert_complete(answer, "cancelled")
        assert not answer.errors
    assert on_phone.chunks == on_laptop.chunks
    stored = await stored_answer(alice, sid, on_phone.message_id)
    assert stored["metadata"]["status"] == "cancelled"
    assert stored["content"] == on_phone.text == answer_text(len(on_phone.chunks))


async def test_an_sse_client_that_leaves_does_not_stop_an_openai_answer(
    people: People, fake_openai: FakeOpenAI
) -> None:
    agent_id = await fake_agent(people, fake_openai)
    alice = people("alice")
    sid = await session_with(alice, agent_id)
    tag = new_user("leave")
    async with alice.http.stream(
        "POST",
        f"{API}/sessions/{sid}/messages/stream",
        json={"content": f"{tag} fake:chunks=30 fake:delay_ms=20"},
        timeout=10,
    ) as response:
        reader = SSEReader(response)
        start = await reader.next()
        assert start is not None and start["type"] == "stream_start"
        assert (await reader.next() or {}).get("type") == "stream_chunk"
    stored = await wait_stored(alice, sid, start["message_id"])
    assert stored["metadata"]["status"] == "completed"
    assert stored["content"] == answer_text(30)
    record = fake_openai.find(tag)[0]
    assert record.finished and not record.disconnected
