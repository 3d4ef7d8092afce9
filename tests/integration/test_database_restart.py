"""PostgreSQL drops the service's connections (a restart, a failover, an idle cut-off).

The pool does not ping before each transaction, so the first statement on a dropped
connection fails; SQLAlchemy then discards every pooled connection, and from the next
call on the service works again without a restart of its own."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from chatservice.app import build_components
from chatservice.components import Components
from chatservice.config import Settings
from chatservice.services.messages import Draft
from tests.conftest import POSTGRES_ADMIN_URL, TEST_SECRET
from tests.integration.helpers import group, users


@pytest.fixture
async def on_postgres(in_process_postgres_url: str, tmp_path: Path) -> AsyncIterator[Components]:
    settings = Settings(
        database_url=in_process_postgres_url,
        jwt_secret_key=TEST_SECRET,
        data_dir=tmp_path,
        database_pool_size=4,
        database_max_overflow=0,
        _env_file=None,
    )
    parts = build_components(settings)
    await parts.bus.start()
    yield parts
    await parts.bus.close()
    await parts.database.close()


async def drop_connections(database: str) -> int:
    admin = await asyncpg.connect(POSTGRES_ADMIN_URL)
    try:
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = $1 AND pid <> pg_backend_pid()",
            database,
        )
    finally:
        await admin.close()
    return int(killed)


async def test_dropped_connections_cost_one_failed_call_then_the_service_recovers(
    on_postgres: Components, in_process_postgres_url: str
) -> None:
    parts = on_postgres
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    for i in range(8):  # several pooled connections in use
        await parts.messages.send(alice, sid, Draft(content=f"before {i}"))
    assert await drop_connections(in_process_postgres_url.rsplit("/", 1)[1]) >= 1

    failures = 0
    sent = 0
    while sent < 10:
        try:
            await parts.messages.send(bob, sid, Draft(content=f"after {sent}"))
        except Exception:
            failures += 1
            assert failures <= 1, "more than one call failed after the connections dropped"
            continue
        sent += 1
    assert failures == 1  # the pool does not ping: the dropped connection is noticed in use
    page = await parts.messages.page(alice, sid, before=None, after=None, limit=100)
    assert [m.seq for m in page.messages] == list(range(1, 19))
