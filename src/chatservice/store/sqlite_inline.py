"""SQLite statements run on the event loop's own thread, through aiosqlite's interface.

aiosqlite gives each connection a worker thread and hands it every call: a queue put, a
thread wake-up and a `call_soon_threadsafe` back for each statement. A commit of one
message is four such trips (begin, update the session's seq, insert, commit), and with
the server on one core each trip is two context switches fighting the event loop for
the GIL: in the chat benchmark at 1,000 messages/s that hand-off was a third of the
server's time, for statements that themselves take tens of microseconds (WAL mode,
`synchronous=NORMAL`, an index lookup or a one-row insert).

So this keeps aiosqlite's connection (SQLAlchemy's aiosqlite dialect drives it
unchanged) and replaces only how a call is carried out: at once, on the caller's thread.
Long statements block the loop for as long as they run, as they held the GIL before.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Generator
from functools import partial
from typing import Any

import aiosqlite
from sqlalchemy.dialects.sqlite.aiosqlite import SQLiteDialect_aiosqlite
from sqlalchemy.engine import make_url


class InlineConnection(aiosqlite.Connection):
    """An aiosqlite connection with no worker thread: each call runs when awaited."""

    async def _execute(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not self._running or not self._connection:
            raise ValueError("Connection closed")
        return fn(*args, **kwargs)

    async def _connect(self) -> InlineConnection:
        if self._connection is None:
            self._connection = self._connector()
        return self

    def __await__(self) -> Generator[Any, None, InlineConnection]:
        return self._connect().__await__()  # no thread to start

    def stop(self) -> asyncio.Future[Any] | None:
        self._running = False
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        return None


def inline_creator(url: str) -> Callable[[], Any]:
    """An `async_creator` for `create_async_engine`: the connection SQLAlchemy's aiosqlite
    dialect would open for `url` (same path and arguments), without the thread."""
    args, kwargs = SQLiteDialect_aiosqlite().create_connect_args(make_url(url))
    connector = partial(sqlite3.connect, *args, **kwargs)

    async def create() -> InlineConnection:
        return await InlineConnection(connector, iter_chunk_size=64)

    return create
