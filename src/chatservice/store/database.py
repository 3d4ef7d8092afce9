"""The engine and transactions: one SQLAlchemy async layer for SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from chatservice.store import migrate
from chatservice.store.sqlite_inline import inline_creator


class SchemaOutOfDate(Exception):
    """The database is not at the newest migration; `chat-service migrate` fixes it."""


class Database:
    """Owns the engine; hands out read connections and write transactions.

    SQLite allows one writer at a time and answers a second with "database is locked"
    after its busy timeout; an in-process lock queues our own writers instead, which is
    both faster and fair. PostgreSQL needs no such lock (row locks do the work).
    """

    def __init__(self, url: str, *, pool_size: int = 20, max_overflow: int = 40) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        # Statement parameters are message contents and metadata: never in an error
        # message or a log line.
        options: dict[str, Any] = {"hide_parameters": True}
        if self.is_sqlite:
            options["async_creator"] = inline_creator(url)
        else:
            # No `pool_pre_ping`: it is a `SELECT 1` round trip before every transaction,
            # a fifth of a message's commit. A connection the server dropped fails its
            # next statement instead; SQLAlchemy then discards the pool's connections, and
            # that one request is answered as an internal error the client retries.
            options |= {"pool_size": pool_size, "max_overflow": max_overflow}
        self.engine: AsyncEngine = create_async_engine(url, **options)
        if self.is_sqlite:
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        self._write_lock: asyncio.Lock | None = asyncio.Lock() if self.is_sqlite else None

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.connect() as connection:
            yield connection

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """A transaction that commits on success and rolls back on any exception."""
        if self._write_lock is None:
            async with self.engine.begin() as connection:
                yield connection
            return
        async with self._write_lock, self.engine.begin() as connection:
            yield connection

    async def ping(self) -> None:
        async with self.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))

    async def check_schema(self) -> None:
        current = await migrate.current_revision(self.engine)
        head = migrate.head_revision()
        if current != head:
            raise SchemaOutOfDate(
                f"database schema is at revision {current or 'none'}, the code needs {head}; "
                "run `chat-service migrate`"
            )

    async def close(self) -> None:
        await self.engine.dispose()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers run while a writer commits; NORMAL sync is durable across app
    # crashes (not power loss), the usual trade for a chat log on one machine.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()
