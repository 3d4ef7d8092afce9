"""One client connection as the hub sees it: a bounded send queue and a writer task."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

# Close codes of the native protocol (README, "Close codes").
CLOSE_NORMAL = 1000
# The server is stopping (uvicorn closes its WebSockets with this code on shutdown too).
CLOSE_SERVICE_RESTART = 1012
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_SLOW_CONSUMER = 4008
CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_NOT_FOUND = 4404

# A replay may be longer than the queue, so it waits for room; a client that reads
# nothing for this long during its replay is treated as slow.
REPLAY_STALL_SECONDS = 10.0

# How long a connection being closed on purpose may take to flush its last frames.
FINISH_DRAIN_SECONDS = 5.0

SendText = Callable[[str], Awaitable[None]]
Close = Callable[[int, str], Awaitable[None]]


class Connection:
    """Frames for one client, in order, never blocking the hub.

    The hub calls `offer` synchronously for every event of the session; the frame goes
    on a bounded queue drained by this connection's own writer task. A client that
    stops reading fills only its own queue; past the bound it is closed with
    CLOSE_SLOW_CONSUMER and recovers with `since_seq`.

    Until `go_live` returns, offered frames are held back so a `since_seq` replay from the
    database can be sent first; `last_seq` then drops anything the replay covered.
    """

    def __init__(
        self,
        conn_id: str,
        session_id: str,
        user_id: str,
        send_text: SendText,
        close: Close,
        queue_size: int,
        *,
        presence: bool = True,
        write_timeout: float | None = None,
    ) -> None:
        self.conn_id = conn_id
        self.presence = presence  # whether it counts as the user being online
        self.session_id = session_id
        self.user_id = user_id
        self.last_seq = 0
        self.closed = False
        self._send_text = send_text
        self._close = close
        self._queue: asyncio.Queue[str] = asyncio.Queue(queue_size)
        self._limit = queue_size
        # A client that reads nothing fills the socket's buffers long before its queue
        # under light traffic; a write that cannot finish in this time marks it as slow.
        self._write_timeout = write_timeout
        self._live = False
        self._held: list[tuple[int | None, str, str | None, int | None]] = []
        self._chunks: dict[str, int] = {}  # stream id -> highest chunk index delivered
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

    def offer(
        self,
        seq: int | None,
        text: str,
        stream_id: str | None = None,
        chunk_index: int | None = None,
    ) -> None:
        """Called by the hub for each event.

        `seq` is set for persisted messages; `stream_id` for an agent stream's frames,
        with `chunk_index` on its chunks (None on its end), so chunks a client already
        got from a resume are not sent again.
        """
        if self.closed:
            return
        if not self._live:
            if len(self._held) >= self._limit:
                self.kill(CLOSE_SLOW_CONSUMER, "send queue full; reconnect with since_seq")
                return
            self._held.append((seq, text, stream_id, chunk_index))
            return
        if self._seen(seq, stream_id, chunk_index):
            return
        self.send_nowait(text)

    def _seen(self, seq: int | None, stream_id: str | None, chunk_index: int | None) -> bool:
        """Whether this frame was delivered already; records it as delivered if not."""
        if seq is not None:
            if seq <= self.last_seq:
                return True
            self.last_seq = seq
        if stream_id is not None:
            if chunk_index is None:
                self._chunks.pop(stream_id, None)
            elif chunk_index <= self._chunks.get(stream_id, -2):
                return True
            else:
                self._chunks[stream_id] = chunk_index
        return False

    async def replay(self, seq: int, text: str) -> None:
        """A frame from history, before going live; waits (boundedly) for queue space."""
        if self.closed or seq <= self.last_seq:
            return
        self.last_seq = seq
        await self._put(text)

    async def replay_stream(self, stream_id: str, chunk_index: int | None, text: str) -> None:
        """A frame of an answer in progress, read from the stream buffer on resume."""
        if self.closed or self._seen(None, stream_id, chunk_index):
            return
        await self._put(text)

    async def go_live(self) -> None:
        """Send what was held back during the replay, then deliver as events come."""
        while self._held and not self.closed:
            held, self._held = self._held, []
            for seq, text, stream_id, chunk_index in held:
                if not self._seen(seq, stream_id, chunk_index):
                    await self._put(text)
        # No await between the last check of _held and here: nothing can slip in.
        self._live = True

    async def _put(self, text: str) -> None:
        try:
            self._queue.put_nowait(text)
            return
        except asyncio.QueueFull:
            pass
        # A replay may be longer than the queue: wait for room, but stop at once if the
        # connection closes, and give up on a client that reads nothing for too long.
        put = asyncio.ensure_future(self._queue.put(text))
        gone = asyncio.ensure_future(self._gone.wait())
        done, _ = await asyncio.wait(
            {put, gone}, timeout=REPLAY_STALL_SECONDS, return_when=asyncio.FIRST_COMPLETED
        )
        put.cancel()
        gone.cancel()
        if put not in done:
            self.kill(CLOSE_SLOW_CONSUMER, "client did not read its replay")

    def send_nowait(self, text: str) -> None:
        try:
            self._queue.put_nowait(text)
        except asyncio.QueueFull:
            self.kill(CLOSE_SLOW_CONSUMER, "send queue full; reconnect with since_seq")

    def kill(self, code: int, reason: str) -> None:
        """Close from inside a synchronous call path (the hub's fan-out)."""
        if self.closed:
            return
        self._mark_closed()
        log.info("closing connection %s: %s", self.conn_id, reason)
        self._closer = asyncio.create_task(self._close_quietly(code, reason))
        if self.idle_reader is not None and self.idle_reader is not asyncio.current_task():
            self.reader_interrupted = True
            self.idle_reader.cancel()

    def finish(self, code: int, reason: str) -> None:
        """Close after the frames already queued are written (e.g. "you were removed")."""
        if self.closed:
            return
        self._mark_closed()
        self._closer = asyncio.create_task(self._close_after_drain(code, reason))

    async def _close_after_drain(self, code: int, reason: str) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), FINISH_DRAIN_SECONDS)
        await self._close_quietly(code, reason)

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

    async def _close_quietly(self, code: int, reason: str) -> None:
        if self._writer is not None:
            self._writer.cancel()
        with contextlib.suppress(Exception):
            await self._close(code, reason)

    async def _write_loop(self) -> None:
        queue = self._queue
        try:
            while True:
                text = await queue.get()
                self._sending = 1
                if self._write_timeout is None:
                    await self._send_text(text)
                else:
                    await asyncio.wait_for(self._send_text(text), self._write_timeout)
                self._sending = 0
                queue.task_done()
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            self.kill(CLOSE_SLOW_CONSUMER, "client stopped reading; reconnect with since_seq")
        except Exception:  # the peer went away mid-send; the reader notices and cleans up
            self._mark_closed()

    def _mark_closed(self) -> None:
        self.closed = True
        self._gone.set()
