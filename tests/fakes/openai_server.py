"""A small OpenAI-compatible model server for tests: a real HTTP server on a free port.

It answers `POST /v1/chat/completions` with `stream: true` the way OpenAI does: Server-Sent
Events of `chat.completion.chunk` objects (`data: {...}` … `data: [DONE]`), the usage in a
last chunk when `stream_options.include_usage` is set. So the production `openai` backend
(the official SDK) runs for real against it.

What it does with a request is scripted by markers in the LAST user message, so every
test picks its behaviour per request without shared state:

    fake:chunks=N          answer in N pieces (default 3); piece i is `piece(i)`
    fake:delay_ms=N        pause N ms before each piece after the first (default 0)
    fake:usage=N           report total_tokens=N (default: prompt words + pieces)
    fake:status=N          answer HTTP N (500, 401, …) with an OpenAI error body
    fake:malformed_at=N    send invalid JSON instead of piece N (pieces 0..N-1 go out)
    fake:stall_after=N     send N pieces, then nothing (connection left open)
    fake:silent            accept the request and never send the response headers

It records each request (model, messages with the system prompt, temperature, …), what it
sent back, and whether the client went away before the answer was complete (and when, on
this process's `time.monotonic()` clock), so tests can assert that a cancel closed the
upstream request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn

JSON = dict[str, Any]

# How long a stalled or silent answer waits for the client before giving up.
STALL_LIMIT = 30.0
_MARKER = re.compile(r"fake:([a-z_]+)(?:=(-?\d+))?")


def piece(index: int) -> str:
    """The text of the fake model's piece `index` (answers are deterministic)."""
    return f"w{index} "


def answer_text(chunks: int) -> str:
    return "".join(piece(i) for i in range(chunks))


@dataclass
class Script:
    chunks: int = 3
    delay_ms: int = 0
    usage: int | None = None
    status: int | None = None
    malformed_at: int | None = None
    stall_after: int | None = None
    silent: bool = False

    @classmethod
    def parse(cls, text: str) -> Script:
        script = cls()
        for name, value in _MARKER.findall(text):
            if name == "silent":
                script.silent = True
            elif name in {"chunks", "delay_ms", "usage", "status", "malformed_at", "stall_after"}:
                setattr(script, name, int(value))
        return script


@dataclass
class Recorded:
    """One request the fake received, and what became of it."""

    body: JSON
    authorization: str | None
    script: Script
    received_at: float
    pieces_sent: int = 0
    usage_total: int | None = None
    finished: bool = False  # the whole response was sent
    disconnected_at: float | None = None  # the client left before the response was complete

    @property
    def model(self) -> str:
        return str(self.body.get("model"))

    @property
    def messages(self) -> list[JSON]:
        return list(self.body.get("messages") or [])

    @property
    def temperature(self) -> float | None:
        return self.body.get("temperature")

    @property
    def last_user(self) -> str:
        users = [m for m in self.messages if m.get("role") == "user"]
        return str(users[-1].get("content", "")) if users else ""

    @property
    def disconnected(self) -> bool:
        return self.disconnected_at is not None


class FakeOpenAI:
    """The ASGI app and the uvicorn server running it in a thread of its own."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """What an OpenAI client takes as `base_url`."""
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeOpenAI:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            self,
            lifespan="off",
            http="h11",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, daemon=True, name="fake-openai"
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the fake OpenAI server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)

    # -- what tests ask ------------------------------------------------------------------

    def find(self, tag: str) -> list[Recorded]:
        """Requests whose last user message contains `tag`, oldest first."""
        return [r for r in list(self.requests) if tag in r.last_user]

    async def wait_for_request(self, tag: str, timeout: float = 10.0) -> Recorded:
        await wait_until(lambda: bool(self.find(tag)), f"a request tagged {tag!r}", timeout)
        return self.find(tag)[-1]

    # -- the ASGI app ----------------------------------------------------------------------

    async def __call__(self, scope: JSON, receive: Callable[..., Any], send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["method"] == "POST" and scope["path"].rstrip("/").endswith("/chat/completions"):
            await self._completions(scope, body, receive, send)
        else:
            await _json(send, 404, {"error": {"message": "not found", "type": "not_found"}})

    async def _completions(self, scope: JSON, raw: bytes, receive: Any, send: Any) -> None:
        try:
            body = json.loads(raw)
        except ValueError:
            await _json(send, 400, {"error": {"message": "bad JSON", "type": "invalid_request"}})
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        record = Recorded(
            body=body,
            authorization=headers.get("authorization"),
            script=Script(),
            received_at=time.monotonic(),
        )
        record.script = Script.parse(record.last_user)
        self.requests.append(record)
        script = record.script

        gone = asyncio.Event()

        async def watch() -> None:
            # uvicorn answers receive() with http.disconnect once the client is gone (or
            # once our response is complete, which `finished` tells apart).
            while (await receive())["type"] != "http.disconnect":
                pass
            if not record.finished:
                record.disconnected_at = time.monotonic()
            gone.set()

        watcher = asyncio.create_task(watch())
        try:
            await self._respond(record, script, body, send, gone)
        finally:
            if record.finished:
                watcher.cancel()
            else:  # stopped early: wait (briefly) to see the client leave
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(gone.wait(), 5)
                watcher.cancel()

    async def _respond(
        self, record: Recorded, script: Script, body: JSON, send: Any, gone: asyncio.Event
    ) -> None:
        async def pause(seconds: float) -> bool:
            """Sleep; True when the client left meanwhile."""
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(gone.wait(), seconds)
            return gone.is_set()

        if script.silent:
            await pause(STALL_LIMIT)
            return
        if script.status is not None:
            record.finished = True
            kind = "invalid_api_key" if script.status == 401 else "server_error"
            await _json(
                send,
                script.status,
                {"error": {"message": f"fake upstream {script.status}", "type": kind}},
            )
            return
        if not body.get("stream"):
            record.finished = True
            await _json(send, 400, {"error": {"message": "only stream: true", "type": "x"}})
            return

        model = str(body.get("model"))
        created = int(time.time())
        ident = f"chatcmpl-fake-{len(self.requests)}"

        def chunk(delta: JSON, finish: str | None = None, **extra: Any) -> bytes:
            payload = {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": None,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
                **extra,
            }
            return b"data: " + json.dumps(payload).encode() + b"\n\n"

        async def emit(data: bytes, more: bool = True) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": more})

        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                ],
            }
        )
        # As OpenAI does: the first chunk names the role and carries no text.
        await emit(chunk({"role": "assistant", "content": ""}))
        for index in range(script.chunks):
            if index and script.delay_ms and await pause(script.delay_ms / 1000):
                return
            if gone.is_set():
                return
            if script.stall_after is not None and index >= script.stall_after:
                await pause(STALL_LIMIT)
                return
            if script.malformed_at is not None and index == script.malformed_at:
                await emit(b'data: {"id": "broken", "choices": [{"delta": {"content": \n\n')
                await pause(STALL_LIMIT)  # the client must give up on its own
                return
            await emit(chunk({"content": piece(index)}))
            record.pieces_sent += 1
        if script.stall_after is not None:
            await pause(STALL_LIMIT)
            return
        await emit(chunk({}, "stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            prompt = sum(len(str(m.get("content", "")).split()) for m in record.messages)
            total = script.usage if script.usage is not None else prompt + script.chunks
            record.usage_total = total
            usage = {
                "prompt_tokens": prompt,
                "completion_tokens": total - prompt,
                "total_tokens": total,
            }
            payload = {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [],
                "usage": usage,
            }
            await emit(b"data: " + json.dumps(payload).encode() + b"\n\n")
        record.finished = True
        await emit(b"data: [DONE]\n\n", more=False)


async def _json(send: Any, status: int, payload: JSON) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": json.dumps(payload).encode()})


async def wait_until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


@contextlib.contextmanager
def running_fake() -> Iterator[FakeOpenAI]:
    """Start a fake OpenAI server for the duration of the block (fixtures wrap this)."""
    fake = FakeOpenAI().start()
    try:
        yield fake
    finally:
        fake.stop()
