"""Agent answers over SSE: send-and-stream, resume from a chunk index, cancel.

An SSE response is a transport on the hub like a WebSocket: a connection of its own
(`Feed`) subscribed to the session, whose frames go to the response instead of a socket,
filtered to one answer. Its queue is the connection's, bounded, under the same
slow-consumer rule and write timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Path, Query
from sse_starlette.sse import EventSourceResponse
from starlette.responses import Response

from chatservice import events
from chatservice.api.deps import Caller, Parts
from chatservice.api.responses import JSONBody, Responses, errors, json_too
from chatservice.api.routing import CheckedRoute
from chatservice.api.schemas import SendMessage
from chatservice.api.sessions import SessionId
from chatservice.components import Components
from chatservice.domain import JSON, Message, SessionKind, new_id
from chatservice.realtime.connection import Connection
from chatservice.realtime.sink import AwaitingSink
from chatservice.services.errors import InvalidInput
from chatservice.services.messages import Draft
from chatservice.values import MAX_INT

router = APIRouter(prefix="/api/chat", tags=["streams"], route_class=CheckedRoute)

MessageId = Annotated[str, Path(min_length=1, max_length=100)]
# `response_class=Response` keeps FastAPI from documenting the stream as JSON; errors
# before the stream starts are JSON (see `errors`).
_SSE: Responses = {
    200: {
        "description": "`data: {json}` events, one frame each, until the answer ends",
        # Before OpenAPI 3.2, an event stream's `schema` describes one event.
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "required": ["data"],
                    "properties": {
                        "data": {
                            "type": "string",
                            "contentMediaType": "application/json",
                            "description": "one frame: stream_start, stream_chunk, "
                            "stream_end, error, or the finished answer as a message",
                        },
                        "event": {"type": "string"},
                    },
                }
            }
        },
    }
}


class Feed:
    """A hub connection feeding an SSE response; not counted as presence.

    The connection's sink hands each frame over through a one-place queue that the
    response drains: a client that reads slowly holds the sink, the connection's own
    bounded queue fills, and it is cut off like a slow WebSocket.
    """

    def __init__(self, parts: Components, session_id: str, user_id: str) -> None:
        self.parts = parts
        self.session_id = session_id
        self._handoff: asyncio.Queue[bytes | None] = asyncio.Queue(1)
        self._ended = False
        self.conn = Connection(
            new_id("sse"),
            user_id,
            AwaitingSink(self._handoff.put, self._close),
            parts.settings.ws_send_queue_size,
            presence=False,
            write_timeout=parts.settings.ws_write_timeout,
        )

    async def _close(self, code: int, reason: str) -> None:
        self._ended = True
        with contextlib.suppress(asyncio.QueueFull):  # a full queue is read, then the end
            self._handoff.put_nowait(None)

    async def open(self) -> None:
        await self.parts.hub.connect(self.conn)
        try:
            sub = await self.parts.hub.subscribe(self.conn, self.session_id)
        except BaseException:
            await self.close()
            raise
        await sub.go_live()

    async def close(self) -> None:
        await self.parts.hub.disconnect(self.conn)
        await self.conn.stop()

    async def frames(self, idle_timeout: float) -> AsyncIterator[JSON]:
        while not (self._ended and self._handoff.empty()):
            try:
                text = await asyncio.wait_for(self._handoff.get(), idle_timeout)
            except TimeoutError:
                return
            if text is None:
                return
            frame = orjson.loads(text)
            if isinstance(frame, dict):
                yield frame


def _sse(frames: AsyncIterator[JSON]) -> EventSourceResponse:
    async def encoded() -> AsyncIterator[dict[str, Any]]:
        async for frame in frames:
            yield {"data": orjson.dumps(frame).decode()}

    # The A2G-compatible REST contract's SSE layout: `data: {...}` lines separated by a
    # blank line.
    return EventSourceResponse(encoded(), sep="\n", ping=15)


def _idle_timeout(parts: Components) -> float:
    return parts.settings.agent_stall_timeout + parts.settings.agent_timeout


@router.post(
    "/sessions/{session_id}/messages/stream",
    response_class=Response,
    responses={**_SSE, **errors(403, 404, 409, 429)},
)
async def send_and_stream(
    session_id: SessionId, body: SendMessage, caller: Caller, parts: Parts
) -> EventSourceResponse:
    """Send a user message to an agent session and stream the agent's answer as SSE."""
    session, _ = await parts.sessions.require_member(caller, session_id)
    if session.kind != SessionKind.AGENT:
        raise InvalidInput("only agent sessions have streamed answers", code="NOT_AGENT_SESSION")
    feed = Feed(parts, session_id, caller.user_id)
    await feed.open()  # before sending: no chunk of the answer can slip past
    try:
        result = await parts.messages.send_as_member(
            caller,
            session,
            Draft(content=body.content, metadata=body.metadata, client_msg_id=body.client_msg_id),
        )
    except BaseException:
        await feed.close()
        raise
    question = result.message.message_id
    if not result.created:
        # A retry (same client_msg_id): its answer may be under way or done already.
        state, stored = await parts.streams.answer_to(result.message)
        if stored is not None:
            await feed.close()
            return _sse(_one(events.message_event(stored)))
        if state is not None:
            return _sse(_resumed(parts, feed, state.message_id, 0))

    async def answer() -> AsyncIterator[JSON]:
        try:
            stream_id = None
            async for frame in feed.frames(_idle_timeout(parts)):
                kind = frame.get("type")
                if stream_id is None:
                    if kind == "stream_start" and frame.get("reply_to") == question:
                        stream_id = frame.get("message_id")
                        yield frame
                    continue
                if frame.get("message_id") != stream_id:
                    continue
                if kind in ("stream_chunk", "error"):
                    yield frame
                elif kind == "stream_end":
                    yield frame
                    return
        finally:
            await feed.close()

    return _sse(answer())


@router.get(
    "/streams/{message_id}", response_class=Response, responses={**_SSE, **errors(403, 404)}
)
async def resume_stream(
    message_id: MessageId,
    caller: Caller,
    parts: Parts,
    from_index: Annotated[int, Query(ge=0, le=MAX_INT)] = 0,
) -> EventSourceResponse:
    """An answer from chunk `from_index` on: buffered chunks, then live ones; or, once it
    has finished, the stored message as one `message` event."""
    state, stored = await parts.streams.resume_state(caller, message_id, from_index)
    if stored is not None or state is None:
        assert stored is not None
        return _sse(_one(events.message_event(stored)))
    feed = Feed(parts, state.session_id, caller.user_id)
    await feed.open()
    return _sse(_resumed(parts, feed, message_id, from_index))


async def _resumed(
    parts: Components, feed: Feed, message_id: str, from_index: int
) -> AsyncIterator[JSON]:
    """An answer from `from_index` on: buffered chunks, then live ones, to its end."""
    try:
        # Read the buffer only now that the feed catches live frames: nothing falls between.
        current = await parts.streams.buffer.read(message_id, from_index)
        if current is None:
            return
        yield events.stream_start_event(
            current.session_id,
            message_id,
            current.meta.get("sender_id", ""),
            current.meta.get("reply_to", ""),
            None,
        )
        last = from_index - 1
        for offset, text in enumerate(current.chunks):
            last = from_index + offset
            yield events.stream_chunk_event(current.session_id, message_id, text, last)
        if current.status != "streaming":
            finished = await parts.messages.store.by_message_id(message_id)
            if finished is not None:
                yield stream_end_from(finished)
            return
        async for frame in feed.frames(_idle_timeout(parts)):
            if frame.get("message_id") != message_id:
                continue
            kind = frame.get("type")
            if kind == "stream_chunk":
                if int(frame.get("index", -1)) <= last:
                    continue
                last = int(frame["index"])
                yield frame
            elif kind == "error":
                yield frame
            elif kind == "stream_end":
                yield frame
                return
    finally:
        await feed.close()


@router.post(
    "/streams/{message_id}/cancel",
    status_code=202,
    responses={**json_too(200, "the answer had ended: its final status"), **errors(403, 404)},
)
async def cancel_stream(message_id: MessageId, caller: Caller, parts: Parts) -> JSONBody:
    status = await parts.streams.cancel(caller, message_id)
    return JSONBody(
        {"message_id": message_id, "status": status},
        status_code=202 if status == "cancelling" else 200,
    )


async def _one(frame: JSON) -> AsyncIterator[JSON]:
    yield frame


def stream_end_from(message: Message) -> JSON:
    meta = message.metadata or {}
    return events.stream_end_event(
        message.session_id,
        message.message_id,
        message.seq,
        message.tokens_used,
        int(meta.get("latency_ms") or message.latency_ms or 0),
        str(meta.get("status", "completed")),
        int(meta.get("chunks") or 0),
    )
