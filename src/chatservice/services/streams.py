"""Agent answers on the spine: which question is answered where and when, and the
cancel, resume and recovery of answers.

A user message in an agent session wakes the session's answer worker. One worker per
session runs at a time across all instances (a lease in `Locks`); it answers the user
messages in order, one answer each (`services/answers.py`), so a second message sent
during an answer is queued behind it, never interleaved.

Cancel is a bus signal on `chat:stream:cancel`: whichever instance runs the answer stops
it, closing the upstream request, and stores the partial text as `cancelled`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from chatservice import events
from chatservice.bus.base import Bus, Locks, StreamBuffer, StreamState
from chatservice.domain import Message, MessageType, Principal, SenderType, Session, SessionKind
from chatservice.services.answers import Answerer, StreamLimits
from chatservice.services.errors import InvalidInput, NotFound
from chatservice.services.leases import HeldLease
from chatservice.services.sessions import SessionService
from chatservice.store.messages import MessageStore

log = logging.getLogger(__name__)

CANCEL_CHANNEL = "chat:stream:cancel"
# After the shutdown grace, interrupted answers get this long to be stored and announced.
STORE_SECONDS = 5.0


class StreamService:
    def __init__(
        self,
        *,
        sessions: SessionService,
        store: MessageStore,
        answerer: Answerer,
        buffer: StreamBuffer,
        locks: Locks,
        bus: Bus,
        limits: StreamLimits,
    ) -> None:
        self.sessions = sessions
        self.store = store
        self.answerer = answerer
        self.buffer = buffer
        self.locks = locks
        self.bus = bus  # cancel signals between instances
        self.publisher = answerer.publisher
        self.limits = limits
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()  # sessions with news while their worker runs
        self._closing = False  # no new answers start: the instance is shutting down

    async def start(self) -> None:
        await self.bus.subscribe([CANCEL_CHANNEL], self._on_cancel_signal)

    async def drain(self, grace: float) -> None:
        """Shutting down: start no new answer, let those running finish for up to `grace`
        seconds, then end the rest with their partial text stored (status `error`) and a
        `stream_end` to everyone. Questions not begun stay unanswered, for whichever
        instance runs `answer_orphans` next (another one, or this one after a restart)."""
        self._closing = True
        running = [task for task in self._workers.values() if not task.done()]
        log.info("draining %d agent worker(s), %d answer(s)", len(running), self.answerer.running)
        if running and grace > 0:
            await asyncio.wait(running, timeout=grace)
        self.answerer.interrupt_all()
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
                        lambda: self.answerer.lease_lost(session_id),
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
                            await self.answerer.answer(current, pending)
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

    # -- cancel and resume -----------------------------------------------------------------

    async def cancel(self, principal: Principal, message_id: str) -> str:
        """Stop an answer from any device or instance; returns the stream's status."""
        state = await self._state_for(principal, message_id)
        if state.status != "streaming":
            return state.status
        await self.bus.publish(CANCEL_CHANNEL, message_id.encode())
        return "cancelling"

    def _on_cancel_signal(self, _channel: str, data: bytes) -> None:
        self.answerer.cancel(data.decode(errors="replace"))

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
            await self.publisher.publish(
                events.stream_end_event(session_id, message_id, None, None, 0, "error", 0)
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
