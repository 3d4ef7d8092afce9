"""PostgreSQL for a run: a fresh database on the admin URL's server, migrated, dropped.

ADMIN_URL (BENCH_POSTGRES_URL, default postgresql://postgres@127.0.0.1:5432/test) is only
used for the admin connection; each run's database sits beside the database it names.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]

from harness.server import PYTHON_CLI

ADMIN_URL = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def database_url(name: str, admin_url: str = ADMIN_URL) -> str:
    base, _, _ = admin_url.rpartition("/")
    return f"{base}/{name}"


async def _admin(sql: str, admin_url: str) -> None:
    conn = await asyncpg.connect(admin_url, timeout=10)
    try:
        await conn.execute(sql, timeout=60)
    finally:
        await conn.close(timeout=5)


@contextlib.contextmanager
def database(prefix: str, *, admin_url: str = ADMIN_URL, keep: bool = False) -> Iterator[str]:
    """A new database's name; dropped afterwards (unless `keep`) whatever happens."""
    # Named before it exists, so an interruption during CREATE still drops it.
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    try:
        asyncio.run(_admin(f'CREATE DATABASE "{name}"', admin_url))
        yield name
    finally:
        if not keep:
            try:
                asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', admin_url))
            except Exception as exc:
                print(f"warning: could not drop database {name}: {exc}", file=sys.stderr)


def migrate(workdir: Path, env: Mapping[str, str], program: Sequence[str] = PYTHON_CLI) -> None:
    """`chat-service migrate` with the server's environment (its DATABASE_URL)."""
    done = subprocess.run(
        [*program, "migrate"],
        env=dict(env),
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=180,
    )
    if done.returncode != 0:
        raise RuntimeError(f"chat-service migrate failed:\n{done.stdout}{done.stderr}")


async def backend_pids(database: str, admin_url: str = ADMIN_URL) -> list[int]:
    """PIDs of the PostgreSQL backends serving `database` (the servers' pools)."""
    conn = await asyncpg.connect(admin_url, timeout=5)
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1", database, timeout=5
        )
    finally:
        await conn.close(timeout=5)
    return [int(row["pid"]) for row in rows]
