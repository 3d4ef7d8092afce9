"""Integration fixtures: the real components (services, store, bus, hub) on each database."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from chatservice.app import build_components
from chatservice.components import Components
from chatservice.config import Settings
from tests.conftest import TEST_SECRET


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
