"""Shared fixtures: real databases (SQLite file and PostgreSQL) and real server processes.

PostgreSQL is required: when it cannot be reached the tests that need it fail with the
reason (never skip), so a green run always means both backends were exercised.
Set TEST_POSTGRES_URL to use another server (default: the local `test` database).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from chatservice.auth import TokenCodec
from chatservice.store.migrate import upgrade

POSTGRES_ADMIN_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
TEST_SECRET = "test-secret-" + uuid.uuid4().hex
BACKENDS = ["sqlite", "postgres"]


def _with_database(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


async def _create_database(name: str) -> None:
    try:
        conn = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
    except Exception as exc:  # fail loudly: CI must never pass without PostgreSQL
        pytest.fail(f"PostgreSQL is required for these tests ({POSTGRES_ADMIN_URL}): {exc}")
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def _drop_database(name: str) -> None:
    conn = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def fresh_postgres() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database, dropped afterwards."""
    name = f"chatservice_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    asyncio.run(_create_database(name))
    url = _with_database(POSTGRES_ADMIN_URL, name)
    upgrade(url.replace("postgresql://", "postgresql+asyncpg://", 1))
    yield url
    asyncio.run(_drop_database(name))


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """The database of the run's server processes (they isolate tests by user ids)."""
    yield from fresh_postgres()


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("sqlite") / "chat.db"
    url = f"sqlite:///{path}"
    upgrade(url.replace("sqlite://", "sqlite+aiosqlite://", 1))
    return url


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest) -> str:
    """Each test using this runs once on SQLite and once on PostgreSQL."""
    return str(request.getfixturevalue(f"{request.param}_url"))


@pytest.fixture(scope="session")
def tokens() -> TokenCodec:
    return TokenCodec(TEST_SECRET)


def new_user(prefix: str = "user") -> str:
    """A user id no other test uses, so tests sharing a database never see each other."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    """A real `chat-service serve` process on a free port."""

    base_url: str
    port: int
    data_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def ws_url(self) -> str:
        return self.base_url.replace("http://", "ws://", 1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def start_server(
    data_dir: Path, database_url: str | None = None, **env_overrides: Any
) -> ServerProcess:
    """Start `chat-service serve` and wait until /readyz answers 200."""
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "DATA_DIR": str(data_dir),
        "JWT_SECRET_KEY": TEST_SECRET,
        "LOG_LEVEL": "INFO",
        # Every test server shares one PostgreSQL (max_connections 100) with the others.
        "DATABASE_POOL_SIZE": "5",
        "DATABASE_MAX_OVERFLOW": "10",
    }
    env.pop("DEBUG", None)
    if database_url:
        env["DATABASE_URL"] = database_url
    env.update({k: str(v) for k, v in env_overrides.items()})
    log_path = data_dir / f"server-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "chatservice.cli", "serve", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = ServerProcess(f"http://127.0.0.1:{port}", port, data_dir, process, log_path, env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.base_url}/readyz", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"server did not become ready:\n{server.log()}")


@dataclass
class RedisProcess:
    """A `redis-server` of the tests' own on a spare port, for isolation and fault
    injection (kill it, start it again on the same port)."""

    port: int
    data_dir: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is required for these tests (apt-get install redis-server)")
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.data_dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        pytest.fail(f"redis-server did not start on port {self.port}")

    def kill(self) -> None:
        """SIGKILL: Redis vanishes mid-conversation, as in a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)

    def stop(self) -> None:
        self.kill()


def start_redis(data_dir: Path) -> RedisProcess:
    data_dir.mkdir(parents=True, exist_ok=True)
    return RedisProcess(free_port(), data_dir).start()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis for the whole run (the tests' own process, not the machine's)."""
    proc = start_redis(tmp_path_factory.mktemp("redis"))
    yield proc.url
    proc.stop()


@pytest.fixture(scope="session", params=BACKENDS)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """One server per backend for the whole run; tests isolate themselves by user ids."""
    url = None if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    proc = start_server(tmp_path_factory.mktemp(f"server-{request.param}"), url)
    yield proc
    proc.stop()


@pytest.fixture
async def http(server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as client:
        yield client
