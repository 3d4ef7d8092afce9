"""The migrations and `store/tables.py` describe the same schema, on both databases."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import create_async_engine

from chatservice.config import async_database_url
from chatservice.store.tables import metadata


async def test_tables_match_the_migrations(database_url: str) -> None:
    engine = create_async_engine(async_database_url(database_url))
    try:
        async with engine.connect() as conn:
            diff = await conn.run_sync(
                lambda sync: compare_metadata(MigrationContext.configure(sync), metadata)
            )
    finally:
        await engine.dispose()
    # Server defaults and type spellings differ harmlessly between dialects; tables,
    # columns and indexes must not.
    structural = [
        d for d in diff if isinstance(d, tuple) and d[0].split("_")[0] in {"add", "remove"}
    ]
    assert structural == []
