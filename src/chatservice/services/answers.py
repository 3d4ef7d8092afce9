"""One agent answer, from the question to the stored message and `stream_end`.

  stream_start → stream_chunk 0, 1, 2, … (bus + stream buffer, not the database)
  → the whole text stored as one `stream` message (its seq) → stream_end {seq, status}

Each running answer has a cancel switch; whoever cuts it short (a user's cancel, a lost
lease, shutdown) flips the switch, and the answer stores its partial text with the
status that says why. Which question is answered when is the worker's business
(`services/streams.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

from chatservice import events
from chatservice.agents.base import AgentBackend, AgentFailure, AgentRequest, Delta, Usage
from chatservice.agents.context import build_context
from chatservice.bus.base import StreamBuffer
from chatservice.domain import (
    Agent,
    Message,
    MessageType,
    SenderType,
    Session,
    isoformat,
    new_id,
    utcnow,
)
from chatservice.publisher import Publisher
from chatservice.store.agents import AgentStore
from chatservice.store.message_writer import AlreadyAnswered, SessionNotWritable
from chatservice.store.messages import MessageStore

log = logging.getLogger(__name__)

INTERRUPTED = "interrupted: the server shut down before the answer was complete"
LEASE_LOST = "interrupted: this instance lost the session's agent lease"
SUPERSEDED = "superseded: the question was answered by another instance"


@dataclass(slots=True)
class StreamLimits:
    total_timeout: float
    context_messages: int
    context_chars: int
    # How long a session's agent lease lasts without renewal (renewed every third).
    lease_seconds: float = 15.0


@dataclass(slots=True)
class _Outcome:
    text: list[str] = field(default_factory=list)
    tokens: int | None = None
    status: str = "completed"
    error: str | None = None


class Answerer:
    def __init__(
        self,
        *,
        store: MessageStore,
        agents: AgentStore,
        backends: dict[str, AgentBackend],
        buffer: StreamBuffer,
        publisher: Publisher,
        limits: StreamLimits,
    ) -> None:
        self.store = store
        self.agents = agents
        self.backends = backends
        self.buffer = buffer
        self.publisher = publisher
        self.limits = limits
        self._running: dict[str, asyncio.Event] = {}  # message id -> its cancel switch
        self._answering: dict[str, str] = {}  # session id -> the answer running in it
        self._lost: set[str] = set()  # answers cut short because their lease was lost
        self._interrupting = False  # answers still running are being cut short

    # -- cutting answers short --------------------------------------------------------------

    @property
    def running(self) -> int:
        return len(self._running)

    def cancel(self, message_id: str) -> None:
        """A user cancelled the answer (from any instance); unknown ids are not ours."""
        switch = self._running.get(message_id)
        if switch is not None:
            switch.set()

    def lease_lost(self, session_id: str) -> None:
        """Another instance may be answering this session now: stop ours where it is."""
        message_id = self._answering.get(session_id)
        switch = self._running.get(message_id) if message_id else None
        if message_id is not None and switch is not None:
            self._lost.add(message_id)
            switch.set()

    def interrupt_all(self) -> None:
        """Shutting down: every running answer ends now with what it has."""
        self._interrupting = True
        for switch in list(self._running.values()):
            switch.set()

    # -- one answer ------------------------------------------------------------------------

    async def answer(self, current: Session, question: Message) -> None:
        session_id = current.session_id
        # The agent and the question's context are read together: both are on the way to
        # the upstream's first token.
        agent, history = await asyncio.gather(
            self._agent(current.agent_id),
            self.store.recent(session_id, question.seq, self.limits.context_messages),
        )
        if agent is None or agent.backend not in self.backends:
            # Answer with an error rather than skip, so the queue moves on.
            outcome = _Outcome(status="error", error="this session's agent is not available")
            await self._store(current, agent, new_id("msg"), outcome, question, 0, 0)
            return
        message_id = new_id("msg")
        # The cancel switch exists before anyone can learn the answer's id.
        cancel = asyncio.Event()
        self._running[message_id] = cancel
        self._answering[session_id] = message_id
        try:
            turns = build_context(agent, history, self.limits.context_chars)
            request = AgentRequest(agent=agent, settings=agent.settings, turns=turns)
            await self._stream(current, agent, question, message_id, request, cancel)
        finally:
            self._running.pop(message_id, None)
            self._answering.pop(session_id, None)
            self._lost.discard(message_id)

    async def _agent(self, agent_id: int | None) -> Agent | None:
        return await self.agents.get(agent_id) if agent_id is not None else None

    async def _announce(self, agent: Agent, question: Message, message_id: str) -> None:
        session_id = question.session_id
        # The buffer first: a client that sees stream_start can resume from it.
        await self.buffer.open(
            message_id,
            session_id,
            {"sender_id": str(agent.id), "reply_to": question.message_id},
        )
        await self.publisher.publish(
            events.stream_start_event(
                session_id, message_id, str(agent.id), question.message_id, isoformat(utcnow())
            )
        )

    async def _stream(
        self,
        current: Session,
        agent: Agent,
        question: Message,
        message_id: str,
        request: AgentRequest,
        cancel: asyncio.Event,
    ) -> None:
        session_id = current.session_id
        started = time.monotonic()
        outcome = _Outcome()
        # The start is announced while the upstream is called: the first chunk waits for
        # the announcement, the upstream call does not.
        announced = asyncio.create_task(self._announce(agent, question, message_id))
        try:
            await self._generate(
                session_id,
                message_id,
                self.backends[agent.backend],
                request,
                outcome,
                cancel,
                announced,
            )
            await announced  # what announcing met stops the answer before it is stored
        finally:
            if not announced.done():
                announced.cancel()
        latency_ms = int((time.monotonic() - started) * 1000)
        chunks = len(outcome.text)
        seq = await self._store(current, agent, message_id, outcome, question, latency_ms, chunks)
        await self.buffer.finish(message_id, outcome.status)
        if outcome.status == "error":
            await self.publisher.publish(
                {
                    "type": "error",
                    "session_id": session_id,
                    "code": "AGENT_ERROR",
                    "message": outcome.error or "the agent failed",
                    "message_id": message_id,
                }
            )
        await self.publisher.publish(
            events.stream_end_event(
                session_id, message_id, seq, outcome.tokens, latency_ms, outcome.status, chunks
            )
        )

    async def _generate(
        self,
        session_id: str,
        message_id: str,
        backend: AgentBackend,
        request: AgentRequest,
        outcome: _Outcome,
        cancel: asyncio.Event,
        announced: asyncio.Task[None],
    ) -> None:
        """Pump the backend's events out as chunks until it ends, fails, times out or is
        cancelled.

        Only the wait for the backend's next event is interrupted by a cancel (or the
        deadline); publishing a chunk always completes, so what was stored is exactly
        what everyone received. Interrupting the wait closes the backend's generator,
        which closes the upstream HTTP response.
        """
        deadline = asyncio.get_running_loop().time() + self.limits.total_timeout
        produced = backend.stream(request)
        cancelled = asyncio.ensure_future(cancel.wait())
        try:
            while True:
                if cancel.is_set():  # a fast backend may never leave the wait below pending
                    self._cut_short(message_id, outcome)
                    return
                upcoming = asyncio.ensure_future(anext(produced))
                remaining = deadline - asyncio.get_running_loop().time()
                done, _ = await asyncio.wait(
                    {upcoming, cancelled},
                    timeout=max(remaining, 0),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if upcoming not in done:
                    upcoming.cancel()
                    with contextlib.suppress(BaseException):
                        await upcoming
                    if cancel.is_set():
                        self._cut_short(message_id, outcome)
                    else:
                        outcome.status = "error"
                        outcome.error = f"the agent took longer than {self.limits.total_timeout}s"
                    return
                try:
                    event = upcoming.result()
                except StopAsyncIteration:
                    return
                if isinstance(event, Delta):
                    if not announced.done():
                        await asyncio.wait({announced})
                    if announced.cancelled() or announced.exception() is not None:
                        return  # the caller raises what announcing met
                    index = len(outcome.text)
                    await self.buffer.append(message_id, event.text)
                    await self.publisher.publish(
                        events.stream_chunk_event(session_id, message_id, event.text, index)
                    )
                    outcome.text.append(event.text)
                elif isinstance(event, Usage):
                    outcome.tokens = event.total_tokens
        except AgentFailure as exc:
            outcome.status, outcome.error = "error", str(exc)
        except Exception as exc:  # a backend bug must end the stream, never hang it
            log.exception("agent backend failed in %s", session_id)
            outcome.status, outcome.error = "error", f"the agent failed: {type(exc).__name__}"
        finally:
            cancelled.cancel()
            with contextlib.suppress(BaseException):
                await produced.aclose()  # type: ignore[attr-defined]

    def _cut_short(self, message_id: str, outcome: _Outcome) -> None:
        if message_id in self._lost:
            outcome.status, outcome.error = "error", LEASE_LOST
        elif self._interrupting:
            outcome.status, outcome.error = "error", INTERRUPTED
        else:
            outcome.status = "cancelled"

    async def _store(
        self,
        session: Session,
        agent: Agent | None,
        message_id: str,
        outcome: _Outcome,
        question: Message,
        latency_ms: int,
        chunks: int,
    ) -> int | None:
        metadata = {
            "tokens_used": outcome.tokens,
            "latency_ms": latency_ms,
            "status": outcome.status,
            "chunks": chunks,
            "reply_to": question.message_id,
        }
        if outcome.error:
            metadata["error"] = outcome.error
        answer = Message(
            message_id=message_id,
            session_id=session.session_id,
            seq=0,
            sender_type=SenderType.AGENT.value,
            sender_id=str(agent.id) if agent else "agent",
            message_type=MessageType.STREAM.value,
            content="".join(outcome.text),
            metadata=metadata,
            created_at=utcnow(),
            tokens_used=outcome.tokens,
            latency_ms=latency_ms,
        )
        try:
            stored, _ = await self.store.append(answer, answers_seq=question.seq)
        except AlreadyAnswered:
            # Only after a lost lease: the other instance's answer is the one kept.
            log.warning(
                "%s was answered by another instance; %s is dropped",
                question.message_id,
                message_id,
            )
            outcome.status, outcome.error = "error", SUPERSEDED
            return None
        except SessionNotWritable:
            log.info(
                "session %s ended during an answer; the answer is not stored", session.session_id
            )
            return None
        return stored.seq
