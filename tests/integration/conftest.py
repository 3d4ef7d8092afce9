"""Integration fixtures: the real components (services, store, bus, hub) on each database."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from chatservice.app import build_components
from chatservice.components import Components
from chatservice.config import Settings
from tests.conftest import BACKENDS, TEST_SECRET, fresh_postgres


@pytest.fixture(scope="session")
def in_process_postgres_url() -> Iterator[str]:
    """Not the server processes' database: a server's orphaned-questions job would take
    the questions of in-process components for its own (the two share no lease) and
    answer them a second time."""
    yield from fresh_postgres()


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, sqlite_url: str) -> str:
    if request.param == "sqlite":
        return sqlite_url
    return str(request.getfixturevalue("in_process_postgres_url"))


@pytest.fixture
async def parts(database_url: str, tmp_path: Path) -> AsyncIterator[Components]:
    # Small pools: the suite shares one PostgreSQL (max_connections 100) with the e2e
    # servers, and a test may run two services side by side.
    settings = Settings(
        database_url=database_url,
        jwt_secret_key=TEST_SECRET,
        data_dir=tmp_path,
        database_pool_size=5,
        database_max_overflow=15,
        _env_file=None,
    )
    components = build_components(settings)
    await components.blobs.start()
    await components.bus.start()
    yield components
    await components.bus.close()
    await components.blobs.close()
    await components.database.close()
