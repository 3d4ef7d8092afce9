"""One client connection as the hub sees it: its subscriptions, a bounded send queue and
a writer task.

A connection follows one or more sessions, each through a `Subscription` that knows how
far the client has got in that session (`last_seq`, the stream chunks it has) and holds
events back while a `since_seq` replay is read from the database. What a subscription
lets through goes, through the connection's codec, onto the one queue of the
connection, in order, drained by its own writer task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from chatservice.domain import JSON
from chatservice.envelope import Envelope
from chatservice.realtime.codec import NATIVE, CloseReason, Codec, frame_for

log = logging.getLogger(__name__)

# A replay may be longer than the queue, so it waits for room; a client that reads
# nothing for this long during its replay is treated as slow.
REPLAY_STALL_SECONDS = 10.0

# How long a connection being closed on purpose may take to flush its last frames.
FINISH_DRAIN_SECONDS = 5.0

SendText = Callable[[str], Awaitable[None]]
Close = Callable[[int, str], Awaitable[None]]


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

    A client that stops reading fills only its own queue; past the bound it is closed
    as a slow consumer and recovers with `since_seq`. `multiplexed` connections (`/ws`)
    follow sessions they subscribe to and also receive their user's own events; a
    subscription they lose ends with a frame, not with the socket.
    """

    def __init__(
        self,
        conn_id: str,
        user_id: str,
        send_text: SendText,
        close: Close,
        queue_size: int,
        *,
        codec: Codec = NATIVE,
        presence: bool = True,
        write_timeout: float | None = None,
        multiplexed: bool = False,
    ) -> None:
        self.conn_id = conn_id
        self.user_id = user_id
        self.codec = codec
        self.presence = presence  # whether it counts as the user being online
        self.multiplexed = multiplexed
        self.subscriptions: dict[str, Subscription] = {}
        self.closed = False
        self.limit = queue_size
        self._send_text = send_text
        self._close = close
        self._queue: asyncio.Queue[str] = asyncio.Queue(queue_size)
        # A client that reads nothing fills the socket's buffers long before its queue
        # under light traffic; a write that cannot finish in this time marks it as slow.
        # The hub's watchdog checks it (`check_write`): a timer per frame would cost more
        # than the write itself.
        self.write_timeout = write_timeout
        self._send_started = 0.0  # loop time the frame being written was handed over
        self._gone = asyncio.Event()  # set once the connection is closing for any reason
        self._writer: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None
        # The task reading the client's frames, while it waits for one: a connection closed
        # from our side stops it at once, instead of after the close handshake, which a
        # client that reads nothing never completes (and its presence would linger).
        self.idle_reader: asyncio.Task[Any] | None = None
        self.reader_interrupted = False
        self._sending = 0  # 1 while the writer is handing a frame to the socket

    @property
    def backlog(self) -> int:
        """Frames queued and not yet written to the socket."""
        return self._queue.qsize() + self._sending

    def start(self) -> None:
        self._writer = asyncio.create_task(self._write_loop(), name=f"ws-writer-{self.conn_id}")

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
        try:
            self._queue.put_nowait(frame)
            return
        except asyncio.QueueFull:
            pass
        # A replay may be longer than the queue: wait for room, but stop at once if the
        # connection closes, and give up on a client that reads nothing for too long.
        put = asyncio.ensure_future(self._queue.put(frame))
        gone = asyncio.ensure_future(self._gone.wait())
        done, _ = await asyncio.wait(
            {put, gone}, timeout=REPLAY_STALL_SECONDS, return_when=asyncio.FIRST_COMPLETED
        )
        put.cancel()
        gone.cancel()
        if put not in done:
            self.kill(CloseReason.SLOW_CONSUMER, "client did not read its replay")

    def send_nowait(self, text: str) -> None:
        if self.closed:
            return
        try:
            self._queue.put_nowait(text)
        except asyncio.QueueFull:
            self.kill(CloseReason.SLOW_CONSUMER, "send queue full; reconnect with since_seq")

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
        self._mark_closed()
        self._closer = asyncio.create_task(
            self._close_after_drain(self.codec.close_code(reason), detail)
        )

    async def _close_after_drain(self, code: int, detail: str) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), FINISH_DRAIN_SECONDS)
        await self._close_quietly(code, detail)

    async def stop(self) -> None:
        """The client is gone or the endpoint is done: end the writer task.

        A close already under way is awaited, so its close frame reaches the client
        before the server lets the socket go.
        """
        self._mark_closed()
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._writer
        if self._closer is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._closer

    async def _close_quietly(self, code: int, detail: str) -> None:
        if self._writer is not None:
            self._writer.cancel()
        with contextlib.suppress(Exception):
            await self._close(code, detail)

    def check_write(self, now: float) -> None:
        """Called by the hub's watchdog: a frame whose write has not finished within the
        write timeout (the client stopped reading) closes the connection as slow."""
        timeout = self.write_timeout
        if (
            timeout is not None
            and self._sending
            and not self.closed
            and now - self._send_started > timeout
        ):
            self.kill(CloseReason.SLOW_CONSUMER, "client stopped reading; reconnect with since_seq")

    async def _write_loop(self) -> None:
        queue = self._queue
        loop = asyncio.get_running_loop()
        send = self._send_text
        try:
            while True:
                text = await queue.get()
                self._sending = 1
                self._send_started = loop.time()
                await send(text)
                self._sending = 0
                queue.task_done()
        except asyncio.CancelledError:
            raise
        except Exception:  # the peer went away mid-send; the reader notices and cleans up
            self._mark_closed()

    def _mark_closed(self) -> None:
        self.closed = True
        self._gone.set()
