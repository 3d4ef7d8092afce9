"""Agent answers on the spine: streamed as bus events, buffered for resume, stored once.

A user message in an agent session wakes the session's answer worker. One worker per
session runs at a time across all instances (a lease in `Locks`); it answers the user
messages in order, one answer each, so a second message sent during an answer is queued
behind it, never interleaved. Each answer:

  stream_start → stream_chunk 0, 1, 2, … (bus + stream buffer, not the database)
  → the whole text stored as one `stream` message (its seq) → stream_end {seq, status}

Cancel is a bus signal on `chat:stream:cancel`: whichever instance runs the answer stops
it, closing the upstream request, and stores the partial text as `cancelled`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

from chatservice import events
from chatservice.agents.base import (
    AgentBackend,
    AgentFailure,
    AgentRequest,
    Delta,
    Turn,
    Usage,
)
from chatservice.agents.context import build_context
from chatservice.bus.base import Bus, Locks, StreamBuffer, StreamState
from chatservice.domain import (
    JSON,
    Agent,
    Message,
    MessageType,
    Principal,
    SenderType,
    Session,
    SessionKind,
    isoformat,
    new_id,
    utcnow,
)
from chatservice.publisher import Publisher
from chatservice.services.errors import InvalidInput, NotFound
from chatservice.services.leases import HeldLease
from chatservice.services.messages import MessageService
from chatservice.services.sessions import SessionService
from chatservice.store.agents import AgentStore
from chatservice.store.messages import AlreadyAnswered, MessageStore, SessionNotWritable

log = logging.getLogger(__name__)

CANCEL_CHANNEL = "chat:stream:cancel"
# After the shutdown grace, interrupted answers get this long to be stored and announced.
STORE_SECONDS = 5.0
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


class StreamService:
    def __init__(
        self,
        *,
        sessions: SessionService,
        messages: MessageService,
        store: MessageStore,
        agents: AgentStore,
        backends: dict[str, AgentBackend],
        buffer: StreamBuffer,
        locks: Locks,
        bus: Bus,
        publisher: Publisher,
        limits: StreamLimits,
    ) -> None:
        self.sessions = sessions
        self.messages = messages
        self.store = store
        self.agents = agents
        self.backends = backends
        self.buffer = buffer
        self.locks = locks
        self.bus = bus  # cancel signals between instances
        self.publisher = publisher
        self.limits = limits
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()  # sessions with news while their worker runs
        self._running: dict[str, asyncio.Event] = {}  # message id -> its cancel switch
        self._answering: dict[str, str] = {}  # session id -> the answer running in it
        self._lost: set[str] = set()  # answers cut short because their lease was lost
        self._closing = False  # no new answers start: the instance is shutting down
        self._interrupting = False  # answers still running are being cut short

    async def start(self) -> None:
        await self.bus.subscribe([CANCEL_CHANNEL], self._on_cancel_signal)

    async def drain(self, grace: float) -> None:
        """Shutting down: start no new answer, let those running finish for up to `grace`
        seconds, then end the rest with their partial text stored (status `error`) and a
        `stream_end` to everyone. Questions not begun stay unanswered, for whichever
        instance runs `answer_orphans` next (another one, or this one after a restart)."""
        self._closing = True
        running = [task for task in self._workers.values() if not task.done()]
        log.info("draining %d agent worker(s), %d answer(s)", len(running), len(self._running))
        if running and grace > 0:
            await asyncio.wait(running, timeout=grace)
        self._interrupting = True
        for cancel in list(self._running.values()):
            cancel.set()
        running = [task for task in self._workers.values() if not task.done()]
        if running:
            await asyncio.wait(running, timeout=STORE_SECONDS)

    async def stop(self) -> None:
        await self.drain(0)
        await self.bus.unsubscribe([CANCEL_CHANNEL], self._on_cancel_signal)
        for task in list(self._workers.values()):
            task.cancel()
        for task in list(self._workers.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def answer_orphans(self, batch: int = 100) -> int:
        """Answer questions nobody is answering: their instance died (its lease expired)
        or stopped before reaching them. Runs at start and as a periodic job, so such a
        question is answered without waiting for the next message."""
        woken = 0
        for session_id in await self.store.sessions_with_unanswered(batch):
            if self._closing:
                break
            if session_id in self._workers:
                continue
            active = await self.buffer.active(session_id)
            if active:
                woken += int(await self._orphaned(session_id, active))
                continue
            lease = f"agent:{session_id}"
            if not await self.locks.acquire(lease, self.limits.lease_seconds):
                continue  # a live instance is answering it
            await self.locks.release(lease)
            self.wake(session_id)
            woken += 1
        return woken

    # -- triggering ------------------------------------------------------------------------

    async def on_message(self, session: Session, message: Message) -> None:
        """Called after any message is stored: users' messages in agent sessions wake
        the session's worker."""
        if session.kind != SessionKind.AGENT or message.sender_type != SenderType.USER:
            return
        self.wake(session.session_id)

    def wake(self, session_id: str) -> None:
        if self._closing:
            return
        worker = self._workers.get(session_id)
        if worker is not None and not worker.done():
            self._again.add(session_id)
            return
        self._workers[session_id] = asyncio.create_task(
            self._work(session_id), name=f"agent-{session_id}"
        )

    async def _work(self, session_id: str) -> None:
        lease = f"agent:{session_id}"
        try:
            while True:
                self._again.discard(session_id)
                if await self.locks.acquire(lease, self.limits.lease_seconds):
                    # Renewed for the worker's whole tenure, between answers too.
                    held = HeldLease(
                        self.locks,
                        lease,
                        self.limits.lease_seconds,
                        lambda: self._lease_lost(session_id),
                    )
                    held.keep()
                    try:
                        while not self._closing and not held.lost:
                            # Together: both are on the way to the upstream's first token.
                            pending, current = await asyncio.gather(
                                self.store.next_unanswered(session_id),
                                self.sessions.store.get(session_id),
                            )
                            if pending is None or current is None:
                                break
                            await self._answer(current, pending)
                    finally:
                        await held.stop()
                        if not held.lost:
                            await self.locks.release(lease)
                    if held.lost:
                        return
                    if session_id not in self._again:
                        return
                else:
                    # Another instance is answering; it takes our message when it is done,
                    # unless it was finishing as ours arrived: look again shortly.
                    await asyncio.sleep(0.5)
                    if await self.store.next_unanswered(session_id) is None:
                        return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("agent worker for %s failed", session_id)
        finally:
            if self._workers.get(session_id) is asyncio.current_task():
                del self._workers[session_id]

    # -- one answer ------------------------------------------------------------------------

    def _lease_lost(self, session_id: str) -> None:
        """Another instance may be answering this session now: stop ours where it is."""
        message_id = self._answering.get(session_id)
        cancel = self._running.get(message_id) if message_id else None
        if message_id is not None and cancel is not None:
            self._lost.add(message_id)
            cancel.set()

    async def _answer(self, current: Session, question: Message) -> None:
        session_id = current.session_id
        agent = await self.agents.get(current.agent_id) if current.agent_id is not None else None
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
            await self._stream_answer(session_id, current, agent, question, message_id, cancel)
        finally:
            self._running.pop(message_id, None)
            self._answering.pop(session_id, None)
            self._lost.discard(message_id)

    async def _stream_answer(
        self,
        session_id: str,
        current: Session,
        agent: Agent,
        question: Message,
        message_id: str,
        cancel: asyncio.Event,
    ) -> None:
        started = time.monotonic()

        async def announce() -> None:
            # The buffer first: a client that sees stream_start can resume from it.
            await self.buffer.open(
                message_id,
                session_id,
                {"sender_id": str(agent.id), "reply_to": question.message_id},
            )
            await self._publish(
                session_id,
                events.stream_start_event(
                    session_id, message_id, str(agent.id), question.message_id, isoformat(utcnow())
                ),
            )

        # The context is read while the start is announced: the upstream call waits for
        # one round trip, not three in series.
        _, turns = await asyncio.gather(announce(), self._context(agent, question))
        outcome = _Outcome()
        request = AgentRequest(agent=agent, settings=agent.settings, turns=turns)
        await self._generate(
            session_id, message_id, self.backends[agent.backend], request, outcome, cancel
        )
        latency_ms = int((time.monotonic() - started) * 1000)
        chunks = len(outcome.text)
        seq = await self._store(current, agent, message_id, outcome, question, latency_ms, chunks)
        await self.buffer.finish(message_id, outcome.status)
        if outcome.status == "error":
            await self._publish(
                session_id,
                {
                    "type": "error",
                    "session_id": session_id,
                    "code": "AGENT_ERROR",
                    "message": outcome.error or "the agent failed",
                    "message_id": message_id,
                },
            )
        await self._publish(
            session_id,
            events.stream_end_event(
                session_id, message_id, seq, outcome.tokens, latency_ms, outcome.status, chunks
            ),
        )

    async def _generate(
        self,
        session_id: str,
        message_id: str,
        backend: AgentBackend,
        request: AgentRequest,
        outcome: _Outcome,
        cancel: asyncio.Event,
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
                    index = len(outcome.text)
                    await self.buffer.append(message_id, event.text)
                    await self._publish(
                        session_id,
                        events.stream_chunk_event(session_id, message_id, event.text, index),
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

    async def _context(self, agent: Agent, question: Message) -> list[Turn]:
        history = await self.store.recent(
            question.session_id, question.seq, self.limits.context_messages
        )
        return build_context(agent, history, self.limits.context_chars)

    async def _publish(self, session_id: str, event: JSON) -> None:
        await self.publisher.publish(event)

    # -- cancel and resume -----------------------------------------------------------------

    async def cancel(self, principal: Principal, message_id: str) -> str:
        """Stop an answer from any device or instance; returns the stream's status."""
        state = await self._state_for(principal, message_id)
        if state.status != "streaming":
            return state.status
        await self.bus.publish(CANCEL_CHANNEL, message_id.encode())
        return "cancelling"

    def _on_cancel_signal(self, _channel: str, data: bytes) -> None:
        cancel = self._running.get(data.decode(errors="replace"))
        if cancel is not None:
            cancel.set()

    async def resume_state(
        self, principal: Principal, message_id: str, from_index: int
    ) -> tuple[StreamState | None, Message | None]:
        """An answer to resume: its buffer while streaming, else the stored message."""
        if from_index < 0:
            raise InvalidInput("from_index must be zero or more")
        state = await self.buffer.read(message_id, from_index)
        if state is not None:
            await self.sessions.require_member(principal, state.session_id)
            if state.status == "streaming":
                return state, None
        stored = await self.store.by_message_id(message_id)
        if stored is None or stored.message_type != MessageType.STREAM:
            raise NotFound("no such stream", code="STREAM_NOT_FOUND")
        await self.sessions.require_member(principal, stored.session_id)
        return None, stored

    async def answer_to(self, question: Message) -> tuple[StreamState | None, Message | None]:
        """The answer to a user message: streaming (its buffer), stored, or not begun."""
        for message_id in await self.buffer.active(question.session_id):
            state = await self.buffer.read(message_id)
            if state is not None and state.meta.get("reply_to") == question.message_id:
                return state, None
        for message in await self.store.after_seq(question.session_id, question.seq, 200):
            if (
                message.message_type == MessageType.STREAM
                and (message.metadata or {}).get("reply_to") == question.message_id
            ):
                return None, message
        return None, None

    async def active_states(self, session_id: str) -> list[StreamState]:
        """Answers in progress in a session, with all their chunks (WS resume)."""
        ids = await self.buffer.active(session_id)
        if not ids:
            return []
        if await self._orphaned(session_id, ids):
            return []
        states = []
        for message_id in ids:
            state = await self.buffer.read(message_id)
            if state is not None and state.status == "streaming":
                states.append(state)
        return states

    async def _orphaned(self, session_id: str, message_ids: list[str]) -> bool:
        """Answers whose instance died: nobody holds the session's lease any more.

        They are ended as errors (so viewers stop waiting) and the worker is woken to
        answer the question again."""
        lease = f"agent:{session_id}"
        if session_id in self._workers or not await self.locks.acquire(
            lease, self.limits.lease_seconds
        ):
            return False
        await self.locks.release(lease)
        for message_id in message_ids:
            await self.buffer.finish(message_id, "error")
            await self._publish(
                session_id,
                events.stream_end_event(session_id, message_id, None, None, 0, "error", 0),
            )
        self.wake(session_id)
        return True

    async def _state_for(self, principal: Principal, message_id: str) -> StreamState:
        state = await self.buffer.read(message_id)
        if state is None:
            stored = await self.store.by_message_id(message_id)
            if stored is None or stored.message_type != MessageType.STREAM:
                raise NotFound("no such stream", code="STREAM_NOT_FOUND")
            await self.sessions.require_member(principal, stored.session_id)
            status = (stored.metadata or {}).get("status", "completed")
            return StreamState(message_id, stored.session_id, str(status), {}, [], 0)
        await self.sessions.require_member(principal, state.session_id)
        return state
