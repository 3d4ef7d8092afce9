"""Agents at the service level, on SQLite and PostgreSQL: the registry, the demo backend,
and answers streamed on the bus (queue, cancel, failures, context) by the real
StreamService, with `openai` agents talking to a real fake OpenAI server over HTTP.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from sqlalchemy import func, select

from chatservice import events
from chatservice.agents.base import AgentRequest, Delta, Turn, Usage
from chatservice.agents.context import DEFAULT_SYSTEM_PROMPT
from chatservice.agents.demo import DemoAgent, demo_answer
from chatservice.agents.openai import OpenAIAgent
from chatservice.agents.policy import UpstreamPolicy
from chatservice.components import Components
from chatservice.domain import Agent, Message, NewSession, Principal, utcnow
from chatservice.envelope import STREAM_TYPES, Envelope
from chatservice.services.agents import public_settings
from chatservice.services.errors import Forbidden, InvalidInput, NotFound
from chatservice.services.messages import Draft
from chatservice.store.message_writer import AlreadyAnswered
from chatservice.store.tables import chat_messages
from tests.conftest import new_user
from tests.fakes.openai_server import FakeOpenAI, answer_text, piece, running_fake
from tests.integration.helpers import BusTap, eventually, users

JSON = dict[str, Any]
ADMIN = Principal("admin-" + new_user(), roles=("admin",))
CHUNK = 10
DELAY_MS = 20
# A question long enough that the demo answer (which quotes it) streams for a while:
# about 90 chunks x 20 ms.
LONG = "please take your time " * 30


@pytest.fixture(scope="module")
def fake_openai() -> Iterator[FakeOpenAI]:
    with running_fake() as fake:
        yield fake


@pytest.fixture
async def live(parts: Components, fake_openai: FakeOpenAI) -> AsyncIterator[Components]:
    """`parts` with the answer service running: demo at 10 chars / 20 ms, and the openai
    backend with a 1 s stall timeout (the real class, talking HTTP through the SDK), allowed
    to call the fake upstream."""
    parts.streams.answerer.backends["demo"] = DemoAgent(CHUNK, DELAY_MS)
    policy = UpstreamPolicy(
        default_base_url="http://127.0.0.1:9/v1", allowed_base_urls=[fake_openai.base_url]
    )
    parts.agents.policy = policy
    upstream = OpenAIAgent(
        default_base_url="http://127.0.0.1:9/v1",
        default_api_key="",
        default_model="unused-default",
        stall_timeout=1.0,
        total_timeout=20.0,
        policy=policy,
    )
    parts.streams.answerer.backends["openai"] = upstream
    await parts.streams.start()
    yield parts
    await parts.streams.stop()
    await upstream.close()


# -- helpers ---------------------------------------------------------------------------------


async def agent_session(parts: Components, owner: Principal, agent_id: int = 1) -> str:
    detail, created = await parts.sessions.create(
        owner, NewSession(kind="agent", agent_id=agent_id, title="ask the agent")
    )
    assert created
    return detail.session.session_id


async def watch(parts: Components, session_id: str) -> BusTap:
    tap = BusTap()
    await parts.bus.subscribe([events.session_channel(session_id)], tap)
    return tap


async def ask(parts: Components, who: Principal, session_id: str, content: str) -> str:
    result = await parts.messages.send(who, session_id, Draft(content=content))
    return result.message.message_id


async def ends(tap: BusTap, count: int = 1, timeout: float = 15.0) -> list[JSON]:
    await eventually(
        lambda: len(tap.of_type("stream_end")) >= count, f"{count} stream_end event(s)", timeout
    )
    return tap.of_type("stream_end")


def of_stream(tap: BusTap, message_id: str) -> list[JSON]:
    return [e for e in tap.events if e.get("message_id") == message_id]


def chunks_of(tap: BusTap, message_id: str) -> list[JSON]:
    return [e for e in of_stream(tap, message_id) if e["type"] == "stream_chunk"]


async def started(tap: BusTap, question_id: str, timeout: float = 10.0) -> str:
    """The stream id of the answer to `question_id`, once it has started."""

    def find() -> str | None:
        for e in tap.of_type("stream_start"):
            if e.get("reply_to") == question_id:
                return str(e["message_id"])
        return None

    await eventually(lambda: find() is not None, f"the answer to {question_id}", timeout)
    stream_id = find()
    assert stream_id is not None
    return stream_id


async def stored_rows(parts: Components, session_id: str) -> int:
    async with parts.database.read() as conn:
        return int(
            (
                await conn.execute(
                    select(func.count())
                    .select_from(chat_messages)
                    .where(chat_messages.c.session_id == session_id)
                )
            ).scalar_one()
        )


async def openai_agent(parts: Components, fake: FakeOpenAI, **settings: Any) -> Agent:
    parts.agents.policy = UpstreamPolicy(
        default_base_url="http://127.0.0.1:9/v1", allowed_base_urls=[fake.base_url]
    )
    return await parts.agents.create(
        ADMIN,
        name="Fake GPT",
        avatar_url="https://example.test/gpt.png",
        backend="openai",
        settings={
            "base_url": fake.base_url,
            "api_key": "sk-test-secret",
            "model": "fake-model",
            **settings,
        },
    )


def demo_request(*questions: str, name: str = "Demo") -> AgentRequest:
    agent = Agent(id=1, name=name, avatar_url=None, backend="demo")
    turns = [Turn("system", "sys")]
    for question in questions:
        turns += [Turn("user", question), Turn("assistant", "an earlier answer")]
    return AgentRequest(agent=agent, settings={}, turns=turns[:-1])


# -- the registry ----------------------------------------------------------------------------


async def test_a_fresh_database_has_the_demo_agent(parts: Components) -> None:
    listed = await parts.agents.list()
    demo = next((a for a in listed if a.id == 1), None)
    assert demo is not None, listed
    assert (demo.name, demo.backend) == ("Demo", "demo")


async def test_only_admins_add_agents(parts: Components) -> None:
    for roles in [(), ("moderator",), ("Admin",)]:
        with pytest.raises(Forbidden):
            await parts.agents.create(
                Principal(new_user(), roles=roles),
                name="Sneaky",
                avatar_url=None,
                backend="demo",
                settings=None,
            )
    created = await parts.agents.create(
        ADMIN,
        name="  Helper  ",
        avatar_url="https://example.test/a.png",
        backend="demo",
        settings={"system_prompt": "be brief"},
    )
    assert (created.name, created.avatar_url, created.backend, created.settings) == (
        "Helper",
        "https://example.test/a.png",
        "demo",
        {"system_prompt": "be brief"},
    )
    assert created.id != 1
    listed = {a.id: a for a in await parts.agents.list()}
    assert listed[created.id].name == "Helper"
    assert [a.id for a in await parts.agents.list()] == sorted(listed)


@pytest.mark.parametrize(
    ("name", "backend"), [("Bot", "gpt"), ("Bot", ""), ("Bot", "DEMO"), ("   ", "demo")]
)
async def test_a_bad_agent_is_refused(parts: Components, name: str, backend: str) -> None:
    before = len(await parts.agents.list())
    with pytest.raises(InvalidInput):
        await parts.agents.create(ADMIN, name=name, avatar_url=None, backend=backend, settings={})
    assert len(await parts.agents.list()) == before


async def test_listings_never_show_an_api_key(parts: Components, fake_openai: FakeOpenAI) -> None:
    agent = await openai_agent(parts, fake_openai, system_prompt="hi")
    assert agent.settings["api_key"] == "sk-test-secret"  # kept, for the backend
    shown = public_settings(agent)
    assert "api_key" not in shown
    assert shown == {"base_url": fake_openai.base_url, "model": "fake-model", "system_prompt": "hi"}
    for listed in await parts.agents.list():
        assert "sk-test-secret" not in repr(public_settings(listed))


# -- the demo backend ------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 7, 10, 64])
async def test_demo_streams_its_answer_in_chunk_size_pieces(size: int) -> None:
    request = demo_request("what is up?", "and now? 🙂")
    runs = []
    for _ in range(2):
        runs.append([e async for e in DemoAgent(size, 0).stream(request)])
    assert runs[0] == runs[1], "the demo agent is deterministic"
    *deltas, usage = runs[0]
    assert all(isinstance(d, Delta) for d in deltas)
    assert isinstance(usage, Usage) and usage.total_tokens > 0
    text = demo_answer(request)
    assert "".join(d.text for d in deltas if isinstance(d, Delta)) == text
    assert "and now? 🙂" in text and "1 earlier message " in text
    assert len(deltas) == math.ceil(len(text) / size)
    assert all(len(d.text) == size for d in deltas[:-1] if isinstance(d, Delta))


async def test_demo_paces_its_chunks_by_the_delay() -> None:
    request = demo_request("short")
    stamps = []
    async for event in DemoAgent(40, 30).stream(request):
        if isinstance(event, Delta):
            stamps.append(time.monotonic())
    assert len(stamps) >= 4
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert min(gaps) >= 0.025, gaps


# -- answers on the spine --------------------------------------------------------------------


async def test_an_answer_streams_on_the_bus_and_is_stored_once(live: Components) -> None:
    (owner,) = users(1)
    sid = await agent_session(live, owner)
    tap = await watch(live, sid)
    question = await ask(live, owner, sid, "hello demo")
    (end,) = await ends(tap)
    stream_id = end["message_id"]
    frames = of_stream(tap, stream_id)
    assert frames[0]["type"] == "stream_start"
    assert frames[0]["reply_to"] == question and frames[0]["sender_type"] == "agent"
    assert frames[-1] is end
    chunks = [f for f in frames if f["type"] == "stream_chunk"]
    assert [c["index"] for c in chunks] == list(range(len(chunks)))
    assert len(chunks) == len(frames) - 2, [f["type"] for f in frames]
    text = "".join(c["content"] for c in chunks)
    assert all(len(c["content"]) == CHUNK for c in chunks[:-1])
    assert '"hello demo"' in text and text.startswith("Demo here.")

    assert end["status"] == "completed"
    assert end["chunks"] == len(chunks)
    assert isinstance(end["tokens_used"], int) and end["tokens_used"] > 0
    assert isinstance(end["latency_ms"], int) and end["latency_ms"] >= 0

    page = await live.messages.page(owner, sid, before=None, after=None, limit=50)
    assert [m.message_type for m in page.messages] == ["text", "stream"]
    answer = page.messages[1]
    assert answer.message_id == stream_id
    assert (answer.seq, answer.sender_type, answer.sender_id) == (end["seq"], "agent", "1")
    assert answer.content == text
    assert answer.metadata is not None
    assert {
        k: answer.metadata.get(k) for k in ("tokens_used", "latency_ms", "status", "chunks")
    } == {
        "tokens_used": end["tokens_used"],
        "latency_ms": end["latency_ms"],
        "status": "completed",
        "chunks": len(chunks),
    }
    assert await stored_rows(live, sid) == 2, "chunks must not be stored one by one"
    # The buffer says it is over; nothing is left streaming.
    assert await live.streams.active_states(sid) == []


async def test_a_second_question_waits_for_the_first_answer(live: Components) -> None:
    (owner,) = users(1)
    sid = await agent_session(live, owner)
    tap = await watch(live, sid)
    first = await ask(live, owner, sid, LONG)
    first_stream = await started(tap, first)
    await eventually(lambda: len(chunks_of(tap, first_stream)) >= 2, "the first chunks")
    second = await ask(live, owner, sid, "and a second thing")
    await ends(tap, 2, timeout=20)
    second_stream = await started(tap, second)

    stream_frames = [(e["type"], e["message_id"]) for e in tap.events if e["type"] in STREAM_TYPES]
    firsts = [i for i, (_, mid) in enumerate(stream_frames) if mid == first_stream]
    seconds = [i for i, (_, mid) in enumerate(stream_frames) if mid == second_stream]
    assert len(firsts) + len(seconds) == len(stream_frames)
    assert max(firsts) < min(seconds), "the answers were interleaved"
    assert stream_frames[firsts[-1]][0] == "stream_end"
    assert stream_frames[seconds[0]][0] == "stream_start"
    assert [e["status"] for e in tap.of_type("stream_end")] == ["completed", "completed"]

    second_text = "".join(c["content"] for c in chunks_of(tap, second_stream))
    assert '"and a second thing"' in second_text
    assert "had 1 earlier message " in second_text  # the first question was in its context
    page = await live.messages.page(owner, sid, before=None, after=None, limit=50)
    assert [(m.seq, m.message_id) for m in page.messages] == [
        (1, first),
        (2, second),
        (3, first_stream),
        (4, second_stream),
    ]


async def test_cancel_stores_the_partial_answer(live: Components) -> None:
    owner, other = users(2)
    sid = await agent_session(live, owner)
    tap = await watch(live, sid)
    question = await ask(live, owner, sid, LONG)
    stream_id = await started(tap, question)
    await eventually(lambda: len(chunks_of(tap, stream_id)) >= 3, "three chunks")
    with pytest.raises(Forbidden):
        await live.streams.cancel(other, stream_id)
    assert await live.streams.cancel(owner, stream_id) == "cancelling"
    (end,) = await ends(tap, timeout=5)
    assert end["message_id"] == stream_id
    assert end["status"] == "cancelled"
    chunks = chunks_of(tap, stream_id)
    full = demo_answer(demo_request(LONG))
    assert 3 <= len(chunks) < math.ceil(len(full) / CHUNK), "the answer was not stopped"
    assert end["chunks"] == len(chunks)
    stored = await live.messages.store.by_message_id(stream_id)
    assert stored is not None and stored.message_type == "stream"
    assert stored.content == "".join(c["content"] for c in chunks)
    assert stored.metadata is not None and stored.metadata["status"] == "cancelled"
    assert not tap.of_type("error"), "a cancel is not an error"
    # Cancelling a finished answer changes nothing and says how it ended.
    assert await live.streams.cancel(owner, stream_id) == "cancelled"
    await asyncio.sleep(0.1)
    assert len(tap.of_type("stream_end")) == 1
    # The session goes on.
    after = await ask(live, owner, sid, "still there?")
    await started(tap, after)
    assert [e["status"] for e in await ends(tap, 2)] == ["cancelled", "completed"]


async def test_cancel_closes_the_upstream_request(
    live: Components, fake_openai: FakeOpenAI
) -> None:
    (owner,) = users(1)
    agent = await openai_agent(live, fake_openai)
    sid = await agent_session(live, owner, agent.id)
    tap = await watch(live, sid)
    tag = new_user("cancel")
    question = await ask(live, owner, sid, f"{tag} fake:chunks=300 fake:delay_ms=30")
    stream_id = await started(tap, question)
    await eventually(lambda: len(chunks_of(tap, stream_id)) >= 3, "three chunks")
    record = await fake_openai.wait_for_request(tag)
    cancelled_at = time.monotonic()
    assert await live.streams.cancel(owner, stream_id) == "cancelling"
    (end,) = await ends(tap, timeout=5)
    assert end["status"] == "cancelled"
    await eventually(lambda: record.disconnected, "the upstream request to close", 5)
    assert record.disconnected_at is not None
    assert record.disconnected_at - cancelled_at < 2.0
    assert record.pieces_sent < 300
    chunks = chunks_of(tap, stream_id)
    stored = await live.messages.store.by_message_id(stream_id)
    assert stored is not None and stored.metadata is not None
    assert stored.metadata["status"] == "cancelled"
    assert stored.content == answer_text(len(chunks)) == "".join(c["content"] for c in chunks)


async def test_cancel_and_resume_check_who_asks(live: Components) -> None:
    owner, stranger = users(2)
    sid = await agent_session(live, owner)
    tap = await watch(live, sid)
    question = await ask(live, owner, sid, LONG)
    stream_id = await started(tap, question)
    await eventually(lambda: len(chunks_of(tap, stream_id)) >= 4, "four chunks")

    state, stored = await live.streams.resume_state(owner, stream_id, 2)
    assert stored is None and state is not None
    assert state.status == "streaming" and state.first_index == 2
    so_far = [c["content"] for c in chunks_of(tap, stream_id)][2:]
    common = min(len(so_far), len(state.chunks))  # either may have grown meanwhile
    assert common >= 2 and state.chunks[:common] == so_far[:common]
    (active,) = await live.streams.active_states(sid)
    assert active.message_id == stream_id

    with pytest.raises(Forbidden):
        await live.streams.cancel(stranger, stream_id)
    with pytest.raises(Forbidden):
        await live.streams.resume_state(stranger, stream_id, 0)
    with pytest.raises(InvalidInput):
        await live.streams.resume_state(owner, stream_id, -1)
    with pytest.raises(NotFound):
        await live.streams.cancel(owner, "msg_does_not_exist")
    with pytest.raises(NotFound):
        await live.streams.resume_state(owner, "msg_does_not_exist", 0)

    (end,) = await ends(tap)
    assert end["status"] == "completed", "a refused cancel must not stop the answer"
    state, stored = await live.streams.resume_state(owner, stream_id, 5)
    assert state is None and stored is not None
    assert stored.content == "".join(c["content"] for c in chunks_of(tap, stream_id))
    with pytest.raises(Forbidden):
        await live.streams.resume_state(stranger, stream_id, 0)
    with pytest.raises(Forbidden):
        await live.streams.cancel(stranger, stream_id)
    # A user message is not a stream.
    with pytest.raises(NotFound):
        await live.streams.resume_state(owner, question, 0)


# -- the openai backend through the service ----------------------------------------------------


async def test_the_context_is_the_system_prompt_and_recent_messages(
    live: Components, fake_openai: FakeOpenAI
) -> None:
    (owner,) = users(1)
    agent = await openai_agent(
        live, fake_openai, system_prompt="You are Fake-Bot.", temperature=0.25
    )
    sid = await agent_session(live, owner, agent.id)
    tap = await watch(live, sid)
    tag = new_user("ctx")
    first = f"{tag} first question"
    await ask(live, owner, sid, first)
    await ends(tap, 1)
    second = f"{tag} second question fake:chunks=4 fake:usage=4242"
    await ask(live, owner, sid, second)
    _, end = await ends(tap, 2)

    record = await fake_openai.wait_for_request(f"{tag} second")
    assert record.model == "fake-model"
    assert record.temperature == 0.25
    assert record.authorization == "Bearer sk-test-secret"
    assert record.body.get("stream") is True
    assert record.messages == [
        {"role": "system", "content": "You are Fake-Bot."},
        {"role": "user", "content": first},
        {"role": "assistant", "content": answer_text(3)},
        {"role": "user", "content": second},
    ]
    assert end["status"] == "completed"
    assert end["tokens_used"] == 4242 == record.usage_total
    chunks = chunks_of(tap, end["message_id"])
    assert [c["content"] for c in chunks] == [piece(i) for i in range(4)]
    assert [c["index"] for c in chunks] == [0, 1, 2, 3]  # the role-only chunk is no chunk
    stored = await live.messages.store.by_message_id(end["message_id"])
    assert stored is not None and stored.content == answer_text(4)
    assert stored.tokens_used == 4242
    assert stored.metadata is not None and stored.metadata["tokens_used"] == 4242

    first_record = fake_openai.find(f"{tag} first")[0]
    first_end = tap.of_type("stream_end")[0]
    assert first_end["tokens_used"] == first_record.usage_total  # the upstream's own count


async def test_the_context_keeps_within_its_budget(
    live: Components, fake_openai: FakeOpenAI
) -> None:
    (owner,) = users(1)
    agent = await openai_agent(live, fake_openai)  # no system prompt: the default one
    sid = await agent_session(live, owner, agent.id)
    tap = await watch(live, sid)
    tag = new_user("budget")
    for n in range(2):
        await ask(live, owner, sid, f"{tag} q{n}")
        await ends(tap, n + 1)

    live.streams.limits.context_messages = 3
    await ask(live, owner, sid, f"{tag} q2")
    await ends(tap, 3)
    record = await fake_openai.wait_for_request(f"{tag} q2")
    assert record.messages == [
        {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
        {"role": "user", "content": f"{tag} q1"},
        {"role": "assistant", "content": answer_text(3)},
        {"role": "user", "content": f"{tag} q2"},
    ]

    live.streams.limits.context_messages = 40
    question = f"{tag} q3"
    live.streams.limits.context_chars = len(question) + len(answer_text(3)) + 2
    await ask(live, owner, sid, question)
    await ends(tap, 4)
    record = await fake_openai.wait_for_request(question)
    assert [m["content"] for m in record.messages[1:]] == [answer_text(3), question]

    live.streams.limits.context_chars = 100
    long_question = "z" * 300 + f" {tag} q4 THE END"  # the tag survives the cut
    await ask(live, owner, sid, long_question)
    await ends(tap, 5)
    record = await fake_openai.wait_for_request(f"{tag} q4")
    assert record.messages[1:] == [{"role": "user", "content": long_question[-100:]}]


@pytest.mark.parametrize(
    ("script", "partial"),
    [
        ("fake:status=500", 0),
        ("fake:status=401", 0),
        ("fake:chunks=5 fake:malformed_at=2", 2),
        ("fake:chunks=5 fake:stall_after=2", 2),
        ("fake:silent", 0),
    ],
    ids=["http-500", "http-401", "malformed-chunk", "stall", "no-response"],
)
async def test_an_upstream_failure_ends_the_answer_as_error(
    live: Components, fake_openai: FakeOpenAI, script: str, partial: int
) -> None:
    (owner,) = users(1)
    agent = await openai_agent(live, fake_openai)
    sid = await agent_session(live, owner, agent.id)
    tap = await watch(live, sid)
    tag = new_user("fail")
    begun = time.monotonic()
    question = await ask(live, owner, sid, f"{tag} {script}")
    stream_id = await started(tap, question)
    (end,) = await ends(tap, timeout=8)
    assert time.monotonic() - begun < 5, "the failure took too long to be noticed"
    assert end["message_id"] == stream_id
    assert end["status"] == "error"
    (error,) = tap.of_type("error")
    assert error["code"] == "AGENT_ERROR" and error["message_id"] == stream_id
    assert error["message"]
    assert tap.events.index(error) < tap.events.index(end)
    chunks = chunks_of(tap, stream_id)
    assert [c["content"] for c in chunks] == [piece(i) for i in range(partial)]
    stored = await live.messages.store.by_message_id(stream_id)
    assert stored is not None and stored.metadata is not None
    assert stored.metadata["status"] == "error"
    assert stored.content == answer_text(partial)
    assert end["chunks"] == partial

    # The session stays usable: the next question is answered normally.
    again = await ask(live, owner, sid, f"{tag} better now")
    await started(tap, again)
    _, second = await ends(tap, 2)
    assert second["status"] == "completed"
    assert "".join(c["content"] for c in chunks_of(tap, second["message_id"])) == answer_text(3)
    record = fake_openai.find(f"{tag} better now")[0]
    assert record.messages[-1] == {"role": "user", "content": f"{tag} better now"}


async def test_a_cancel_right_after_stream_start_is_not_lost(
    live: Components, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client may cancel as soon as it sees `stream_start` (it names the answer). The
    service accepts that cancel ("cancelling"), so it must stop the answer, even when the
    answer is still reading its context (here a slow database read widens that moment)."""
    recent = live.streams.store.recent

    async def slow_recent(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0.3)
        return await recent(*args, **kwargs)

    monkeypatch.setattr(live.streams.store, "recent", slow_recent)
    (owner,) = users(1)
    sid = await agent_session(live, owner)
    tap = await watch(live, sid)
    replies: list[asyncio.Future[str]] = []

    def cancel_at_start(_channel: str, data: bytes) -> None:
        event = Envelope.decode(data).event
        if event.get("type") == "stream_start":
            replies.append(asyncio.ensure_future(live.streams.cancel(owner, event["message_id"])))

    await live.bus.subscribe([events.session_channel(sid)], cancel_at_start)
    await ask(live, owner, sid, LONG)
    (end,) = await ends(tap, timeout=10)
    assert [await r for r in replies] == ["cancelling"]
    assert end["status"] == "cancelled", (
        f"the cancel was accepted but the answer went on: {end['chunks']} chunks, {end}"
    )


async def test_an_answer_longer_than_agent_timeout_ends_as_error(
    live: Components, fake_openai: FakeOpenAI
) -> None:
    live.streams.limits.total_timeout = 1.0
    (owner,) = users(1)
    agent = await openai_agent(live, fake_openai)
    sid = await agent_session(live, owner, agent.id)
    tap = await watch(live, sid)
    tag = new_user("slow")
    begun = time.monotonic()
    await ask(live, owner, sid, f"{tag} fake:chunks=100 fake:delay_ms=100")
    (end,) = await ends(tap, timeout=8)
    assert 0.9 < time.monotonic() - begun < 4
    assert end["status"] == "error"
    (error,) = tap.of_type("error")
    assert error["code"] == "AGENT_ERROR"
    record = await fake_openai.wait_for_request(tag)
    await eventually(lambda: record.disconnected, "the upstream request to close", 5)
    chunks = chunks_of(tap, end["message_id"])
    assert 3 <= len(chunks) < 100
    stored = await live.messages.store.by_message_id(end["message_id"])
    assert stored is not None and stored.content == answer_text(len(chunks))


async def test_a_question_is_stored_as_answered_once(parts: Components) -> None:
    """The database keeps one answer per question, whichever instance stores first: a
    second answer to the same question (from an instance that lost its lease) is refused."""
    owner = Principal(new_user())
    detail, _ = await parts.sessions.create(owner, NewSession(kind="agent", agent_id=1))
    session = detail.session

    def message(sender_type: str, message_type: str, metadata: JSON | None = None) -> Message:
        return Message(
            message_id=f"msg_{new_user()}",
            session_id=session.session_id,
            seq=0,
            sender_type=sender_type,
            sender_id=owner.user_id,
            message_type=message_type,
            content="words",
            metadata=metadata,
            created_at=utcnow(),
        )

    # Stored directly, so no worker of this instance starts answering it meanwhile.
    question, _ = await parts.messages.store.append(message("user", "text"))

    def answer() -> Message:
        return message("agent", "stream", {"reply_to": question.message_id})

    first, created = await parts.messages.store.append(answer(), answers_seq=question.seq)
    assert created and first.seq == question.seq + 1
    with pytest.raises(AlreadyAnswered):
        await parts.messages.store.append(answer(), answers_seq=question.seq)
    assert await parts.messages.store.last_seq(session.session_id) == first.seq
