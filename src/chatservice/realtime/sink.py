"""Where a connection's frames go: a socket that takes them a batch at a time.

A connection hands its sink every frame queued since the last hand-over in one call, and
holds the next ones while the sink says it is `paused` (the socket's buffers are full,
or earlier frames are still on their way). The sink tells the connection when it can
take more (`on_resume`), and the hub's watchdog closes a connection whose sink has been
paused for longer than the write timeout: its client stopped reading.

Two kinds exist. A WebSocket served by this service's own uvicorn protocol writes the
whole batch to the transport in one call (`api/direct_frames.py`). Anything else that
sends one frame at a time with an `await` (a WebSocket under another ASGI server, an SSE
response) goes through `AwaitingSink`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol

SendFrame = Callable[[bytes], Awaitable[None]]
Close = Callable[[int, str], Awaitable[None]]


class FrameSink(Protocol):
    @property
    def paused(self) -> bool:
        """Frames handed over earlier are not all on their way yet: hold the next ones."""

    @property
    def paused_since(self) -> float:
        """The loop time the current pause began (meaningful while `paused`)."""

    def on_resume(self, callback: Callable[[], None]) -> None:
        """Call `callback` whenever a pause ends."""

    def write(self, frames: list[bytes]) -> None:
        """Hand these frames (UTF-8 text payloads) over, in order, without waiting.
        Raises ConnectionError when the socket is gone."""

    def discard(self) -> None:
        """The connection is closing: drop whatever has not gone out yet."""

    async def close(self, code: int, reason: str) -> None: ...


class AwaitingSink:
    """A sink over a send that takes one frame and may wait: its own task sends them."""

    def __init__(self, send: SendFrame, close: Close) -> None:
        self._send = send
        self._close = close
        self._waiting: deque[bytes] = deque()
        self._ready = asyncio.Event()
        self._busy = False  # frames are being sent
        self._failed = False
        self._resume: Callable[[], None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._since = 0.0

    @property
    def paused(self) -> bool:
        return self._busy

    @property
    def paused_since(self) -> float:
        return self._since

    def on_resume(self, callback: Callable[[], None]) -> None:
        self._resume = callback

    def write(self, frames: list[bytes]) -> None:
        if self._failed:
            raise ConnectionError("the socket is gone")
        self._waiting.extend(frames)
        self._busy = True
        self._since = asyncio.get_running_loop().time()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="frame-sender")
        self._ready.set()

    def discard(self) -> None:
        self._waiting.clear()
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()

    async def close(self, code: int, reason: str) -> None:
        self.discard()
        await self._close(code, reason)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        waiting, send = self._waiting, self._send
        try:
            while True:
                await self._ready.wait()
                self._ready.clear()
                while waiting:
                    self._since = loop.time()
                    await send(waiting.popleft())
                self._busy = False
                if self._resume is not None:
                    self._resume()
        except asyncio.CancelledError:
            raise
        except Exception:  # the peer went away mid-send; the reader notices and cleans up
            self._failed = True
            self._busy = False
            waiting.clear()
            if self._resume is not None:
                with contextlib.suppress(Exception):
                    self._resume()
