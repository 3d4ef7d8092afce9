"""Helpers for the agent end-to-end tests: people with tokens, answers read off a
WebSocket (raw `websockets` or the SDK), and SSE read with plain `httpx`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from chatservice.auth import TokenCodec
from chatservice.client import ChatClient, RealtimeConnection
from tests.conftest import ServerProcess, new_user
from tests.e2e.conftest import bearer, recv_json, ws_connect

JSON = dict[str, Any]
API = "/api/chat"
Reader = Callable[[float], Awaitable[JSON]]
_ANSWER_TYPES = frozenset({"stream_start", "stream_chunk", "stream_end", "error"})


@dataclass
class Person:
    id: str
    token: str
    client: ChatClient
    http: httpx.AsyncClient

    @property
    def headers(self) -> dict[str, str]:
        return bearer(self.token)


class People:
    """`people("alice")` → a fresh user on `server` with an SDK client and an httpx client."""

    def __init__(self, server: ServerProcess, tokens: TokenCodec) -> None:
        self.server = server
        self.tokens = tokens
        self._made: list[Person] = []

    def __call__(self, prefix: str = "user", roles: list[str] | None = None) -> Person:
        user_id = new_user(prefix)
        token = self.tokens.issue(user_id, roles=roles)
        person = Person(
            user_id,
            token,
            ChatClient(self.server.base_url, token),
            httpx.AsyncClient(base_url=self.server.base_url, headers=bearer(token), timeout=10),
        )
        self._made.append(person)
        return person

    async def aclose(self) -> None:
        for person in self._made:
            await person.client.aclose()
            await person.http.aclose()


async def device(server: ServerProcess, session_id: str, token: str, **kwargs: Any) -> Any:
    """A raw WebSocket that may be left with frames unread: a deep receive queue, so the
    socket keeps being read and closing it never waits out the close timeout."""
    kwargs.setdefault("max_queue", 4096)
    kwargs.setdefault("close_timeout", 2)
    return await ws_connect(server, session_id, token, **kwargs)


def raw_reader(ws: Any) -> Reader:
    async def read(timeout: float) -> JSON:
        return await recv_json(ws, timeout)

    return read


def sdk_reader(conn: RealtimeConnection) -> Reader:
    async def read(timeout: float) -> JSON:
        return await conn.receive(timeout)

    return read


@dataclass
class Answer:
    """An agent answer as one connection saw it."""

    start: JSON | None = None
    chunks: list[JSON] = field(default_factory=list)
    errors: list[JSON] = field(default_factory=list)
    end: JSON | None = None
    others: list[JSON] = field(default_factory=list)  # frames not of this answer

    @property
    def message_id(self) -> str:
        assert self.start is not None
        return str(self.start["message_id"])

    @property
    def indexes(self) -> list[int]:
        return [int(c["index"]) for c in self.chunks]

    @property
    def text(self) -> str:
        return "".join(c["content"] for c in self.chunks)


async def read_answer(
    read: Reader,
    *,
    until_chunks: int | None = None,
    until_other: str | None = None,
    answer: Answer | None = None,
    timeout: float = 20.0,
) -> Answer:
    """Read frames into `answer` (a new one: from its `stream_start`) until its
    `stream_end`, or until it holds `until_chunks` chunks, or until a frame of type
    `until_other` that is not part of it arrives (then last in `answer.others`)."""
    answer = answer or Answer()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while answer.end is None:
        if until_chunks is not None and len(answer.chunks) >= until_chunks:
            return answer
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise TimeoutError(f"the answer did not finish within {timeout}s: {answer}")
        frame = await read(remaining)
        kind = frame.get("type")
        if answer.start is None:
            if kind == "stream_start":
                answer.start = frame
            else:
                answer.others.append(frame)
            continue
        if frame.get("message_id") != answer.message_id or kind not in _ANSWER_TYPES:
            answer.others.append(frame)
            if kind == until_other:
                return answer
        elif kind == "stream_chunk":
            answer.chunks.append(frame)
        elif kind == "error":
            answer.errors.append(frame)
        elif kind == "stream_end":
            answer.end = frame
        else:  # stream_start
            raise AssertionError(f"a second stream_start for {answer.message_id}: {frame}")
    return answer


def assert_complete(answer: Answer, status: str = "completed") -> JSON:
    """Start, chunks 0..n-1 without gap or repeat, and an end with the fields of the
    A2G-compatible REST contract."""
    assert answer.start is not None and answer.end is not None, answer
    assert answer.start["sender_type"] == "agent"
    assert answer.indexes == list(range(len(answer.chunks))), answer.indexes
    end = answer.end
    assert end["status"] == status, end
    assert isinstance(end["seq"], int) and end["seq"] > 0, end
    assert isinstance(end["latency_ms"], int) and end["latency_ms"] >= 0, end
    assert "tokens_used" in end
    if status == "completed":
        assert isinstance(end["tokens_used"], int) and end["tokens_used"] > 0, end
    return end


class SSEReader:
    """Events of an open `text/event-stream` response, read line by line."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines: AsyncIterator[str] = response.aiter_lines()
        self.lines: list[str] = []

    async def next(self, timeout: float = 10.0) -> JSON | None:
        """The next event's JSON data, or None when the response ended."""
        data: list[str] = []
        while True:
            try:
                line = await asyncio.wait_for(anext(self._lines), timeout)
            except StopAsyncIteration:
                if data:
                    raise AssertionError(f"the stream ended inside an event: {data}") from None
                return None
            self.lines.append(line)
            if line.startswith(":"):
                continue  # a comment (keep-alive)
            if line == "":
                if data:
                    value = json.loads("\n".join(data))
                    assert isinstance(value, dict), value
                    return value
                continue
            assert line.startswith("data: "), f"not a data line: {line!r}"
            data.append(line[len("data: ") :])

    async def rest(self, timeout: float = 20.0) -> list[JSON]:
        """Every remaining event until the response ends."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        found = []
        while (event := await self.next(max(0.01, deadline - loop.time()))) is not None:
            found.append(event)
        return found


async def stored_answer(person: Person, session_id: str, message_id: str) -> JSON:
    for message in await person.client.history(session_id):
        if message["message_id"] == message_id:
            return message
    raise AssertionError(f"{message_id} is not in the history of {session_id}")


async def wait_stored(
    person: Person, session_id: str, message_id: str, timeout: float = 15.0
) -> JSON:
    """The stored answer, once it has been stored."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        for message in await person.client.history(session_id):
            if message["message_id"] == message_id:
                return message
        if loop.time() > deadline:
            raise AssertionError(f"{message_id} was not stored within {timeout}s")
        await asyncio.sleep(0.05)
