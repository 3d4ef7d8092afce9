"""One client connection as the hub sees it: its subscriptions, a bounded send queue and
a writer task.

A connection follows one or more sessions, each through a `Subscription` that knows how
far the client has got in that session (`last_seq`, the stream chunks it has) and holds
events back while a `since_seq` replay is read from the database. What a subscription
lets through goes, through the connection's codec, onto the one queue of the
connection, in order, and from there to its sink (`realtime/sink.py`) a batch at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from chatservice.domain import JSON
from chatservice.envelope import Envelope
from chatservice.realtime.codec import NATIVE, CloseReason, Codec, frame_for
from chatservice.realtime.sink import FrameSink

log = logging.getLogger(__name__)

# A replay may be longer than the queue, so it waits for room; a client that reads
# nothing for this long during its replay is treated as slow.
REPLAY_STALL_SECONDS = 10.0

# How long a connection being closed on purpose may take to flush its last frames.
FINISH_DRAIN_SECONDS = 5.0


class Subscription:
    """One session followed by one connection.

    The hub calls `offer` synchronously for every event of the session. Until `go_live`
    returns, events are held back so a `since_seq` replay from the database goes first;
    `last_seq` then drops anything the replay covered, and a stream's chunks the client
    already got from a resume are not sent again.
    """

    __slots__ = ("_chunks", "_held", "active", "conn", "last_seq", "live", "session_id")

    def __init__(self, conn: Connection, session_id: str) -> None:
        self.conn = conn
        self.session_id = session_id
        self.last_seq = 0
        self.live = False
        self.active = True  # False once unsubscribed: nothing more goes out
        self._held: list[Envelope] = []
        self._chunks: dict[str, int] = {}  # stream id -> highest chunk index delivered

    def offer(self, envelope: Envelope) -> None:
        conn = self.conn
        if conn.closed or not self.active:
            return
        if not self.live:
            if len(self._held) >= conn.limit:
                conn.kill(CloseReason.SLOW_CONSUMER, "send queue full; reconnect with since_seq")
                return
            self._held.append(envelope)
            return
        if not self._seen(envelope.seq, envelope.stream_id, envelope.chunk):
            conn.push(envelope)

    def _seen(self, seq: int | None, stream_id: str | None, chunk: int | None) -> bool:
        """Whether this event was delivered already; records it as delivered if not."""
        if seq is not None:
            if seq <= self.last_seq:
                return True
            self.last_seq = seq
        if stream_id is not None:
            if chunk is None:
                self._chunks.pop(stream_id, None)
            elif chunk <= self._chunks.get(stream_id, -2):
                return True
            else:
                self._chunks[stream_id] = chunk
        return False

    async def replay(self, envelope: Envelope) -> None:
        """An event from history or from an answer's buffer, before going live; waits
        (boundedly) for queue space."""
        if self.conn.closed or not self.active:
            return
        if self._seen(envelope.seq, envelope.stream_id, envelope.chunk):
            return
        await self.conn.put(envelope)

    async def go_live(self) -> None:
        """Send what was held back during the replay, then deliver as events come."""
        while self._held and not self.conn.closed:
            held, self._held = self._held, []
            for envelope in held:
                if not self._seen(envelope.seq, envelope.stream_id, envelope.chunk):
                    await self.conn.put(envelope)
        # No await between the last check of _held and here: nothing can slip in.
        self.live = True


class Connection:
    """Frames for one client, in order, never blocking the hub.

    Frames queue on the connection and go to its sink together, once per turn of the
    event loop: a burst of events costs one write to the socket, not one each. A client
    that stops reading fills only its own queue; past the bound it is closed as a slow
    consumer and recovers with `since_seq`. `multiplexed` connections (`/ws`) follow
    sessions they subscribe to and also receive their user's own events; a subscription
    they lose ends with a frame, not with the socket.
    """

    def __init__(
        self,
        conn_id: str,
        user_id: str,
        sink: FrameSink,
        queue_size: int,
        *,
        codec: Codec = NATIVE,
        presence: bool = True,
        write_timeout: float | None = None,
        multiplexed: bool = False,
        expires_at: float | None = None,
    ) -> None:
        self.conn_id = conn_id
        self.user_id = user_id
        self.codec = codec
        self.presence = presence  # whether it counts as the user being online
        self.multiplexed = multiplexed
        self.subscriptions: dict[str, Subscription] = {}
        self.closed = False
        self.limit = queue_size
        self.sink = sink
        sink.on_resume(self._flush)
        self._pending: list[bytes] = []  # frames not yet handed to the sink
        self._flush_scheduled = False
        self._draining = False  # closed, but what is queued still goes out first
        self._loop = asyncio.get_running_loop()
        # A client that reads nothing fills the socket's buffers long before its queue
        # under light traffic; a sink paused for this long marks it as slow. The hub's
        # watchdog checks it (`check`): a timer per frame would cost more than the
        # write itself.
        self.write_timeout = write_timeout
        # A connection lives no longer than its token (epoch seconds): the watchdog closes
        # it with 4401 and the client reconnects with a fresh one and `since_seq`.
        self.expires_at = expires_at
        # Made when first waited on: most connections never wait, and an idle connection's
        # memory is what caps how many one process holds.
        self._room: asyncio.Event | None = None  # set whenever frames went to the sink
        self._gone: asyncio.Event | None = None  # set once the connection is closing
        self._closer: asyncio.Task[None] | None = None
        # The task reading the client's frames, while it waits for one: a connection closed
        # from our side stops it at once, instead of after the close handshake, which a
        # client that reads nothing never completes (and its presence would linger).
        self.idle_reader: asyncio.Task[Any] | None = None
        self.reader_interrupted = False

    @property
    def backlog(self) -> int:
        """Frames queued and not yet handed to the socket (1 for a paused socket)."""
        return len(self._pending) + int(self.sink.paused)

    def push(self, envelope: Envelope) -> None:
        """An event, live: through the codec onto the queue, or closed as slow if full."""
        frame = frame_for(self.codec, envelope)
        if frame is not None:
            self.send_nowait(frame)

    def send_control(self, frame: JSON) -> None:
        """A frame of the connection itself (connected, error, pong, …)."""
        self.send_nowait(self.codec.control(frame))

    async def put(self, envelope: Envelope) -> None:
        """An event of a replay: waits (boundedly) for room in the queue."""
        frame = frame_for(self.codec, envelope)
        if frame is None:
            return
        # A replay may be longer than the queue: wait for room, but stop at once if the
        # connection closes, and give up on a client that reads nothing for too long.
        loop = self._loop
        deadline = loop.time() + REPLAY_STALL_SECONDS
        while len(self._pending) >= self.limit and not self.closed:
            if not await self._room_or_gone(deadline - loop.time()):
                self.kill(CloseReason.SLOW_CONSUMER, "client did not read its replay")
                return
        self.send_nowait(frame)

    def send_nowait(self, frame: bytes) -> None:
        if self.closed:
            return
        pending = self._pending
        if len(pending) >= self.limit:
            self.kill(CloseReason.SLOW_CONSUMER, "send queue full; reconnect with since_seq")
            return
        pending.append(frame)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Hand everything queued to the sink, unless it is paused (it calls again when
        it resumes)."""
        self._flush_scheduled = False
        if self.closed and not self._draining:
            return
        if self._pending and not self.sink.paused:
            frames, self._pending = self._pending, []
            try:
                self.sink.write(frames)
            except ConnectionError:  # the peer went away; the reader notices and cleans up
                self._mark_closed()
                return
        if self._room is not None:
            self._room.set()

    def _room_event(self) -> asyncio.Event:
        if self._room is None:
            self._room = asyncio.Event()
        self._room.clear()
        return self._room

    async def _room_or_gone(self, timeout: float) -> bool:
        """Wait until frames went out or the connection closes; False on timeout."""
        if self._gone is None:
            self._gone = asyncio.Event()
            if self.closed:
                self._gone.set()
        room = asyncio.ensure_future(self._room_event().wait())
        gone = asyncio.ensure_future(self._gone.wait())
        done, _ = await asyncio.wait(
            {room, gone}, timeout=max(timeout, 0), return_when=asyncio.FIRST_COMPLETED
        )
        room.cancel()
        gone.cancel()
        return bool(done)

    def kill(self, reason: CloseReason, detail: str) -> None:
        """Close from inside a synchronous call path (the hub's fan-out)."""
        if self.closed:
            return
        self._mark_closed()
        log.info("closing connection %s: %s", self.conn_id, detail)
        self._closer = asyncio.create_task(
            self._close_quietly(self.codec.close_code(reason), detail)
        )
        if self.idle_reader is not None and self.idle_reader is not asyncio.current_task():
            self.reader_interrupted = True
            self.idle_reader.cancel()

    def finish(self, reason: CloseReason, detail: str) -> None:
        """Close after the frames already queued are written (e.g. "you were removed")."""
        if self.closed:
            return
        self._closer = asyncio.create_task(
            self._close_after_drain(self.codec.close_code(reason), detail)
        )
        self._mark_closed(keep_frames=True)

    async def _close_after_drain(self, code: int, detail: str) -> None:
        loop = self._loop
        deadline = loop.time() + FINISH_DRAIN_SECONDS
        while self._pending or self.sink.paused:
            room = self._room_event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(room.wait(), deadline - loop.time())
            if loop.time() >= deadline:
                break
        await self._close_quietly(code, detail)

    async def stop(self) -> None:
        """The client is gone or the endpoint is done: write nothing more.

        A close already under way is awaited, so its close frame reaches the client
        before the server lets the socket go.
        """
        self._mark_closed()
        if self._closer is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._closer

    async def _close_quietly(self, code: int, detail: str) -> None:
        self._draining = False
        self._pending = []
        with contextlib.suppress(Exception):
            await self.sink.close(code, detail)

    def check(self, now: float, wall: float) -> None:
        """Called by the hub's watchdog (`now` the loop's time, `wall` epoch seconds): a
        socket paused for longer than the write timeout (the client stopped reading)
        closes the connection as slow; an expired token closes it as unauthorised."""
        if self.closed:
            return
        timeout = self.write_timeout
        sink = self.sink
        if timeout is not None and sink.paused and now - sink.paused_since > timeout:
            self.kill(CloseReason.SLOW_CONSUMER, "client stopped reading; reconnect with since_seq")
        elif self.expires_at is not None and wall >= self.expires_at:
            self.kill(CloseReason.UNAUTHORIZED, "token expired")

    def _mark_closed(self, keep_frames: bool = False) -> None:
        self.closed = True
        if self._gone is not None:
            self._gone.set()
        self._draining = keep_frames
        if not keep_frames:
            self._pending = []
            self.sink.discard()
