"""`chat-service` as a user runs it: token, serve, migrate, in a subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import websockets

from chatservice.auth import TokenCodec
from chatservice.config import SAMPLE_JWT_SECRET
from chatservice.store.migrate import head_revision
from tests.conftest import (
    POSTGRES_ADMIN_URL,
    TEST_SECRET,
    _create_database,
    _drop_database,
    _with_database,
    free_port,
    start_server,
)
from tests.e2e.conftest import bearer

_SCRIPT = Path(sys.executable).with_name("chat-service")
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "chatservice.cli"]


def user_env(data_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a user who set only what they mean to set."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("JWT_SECRET_KEY", "DEBUG", "DATABASE_URL", "DATA_DIR", "SERVICE_PORT")
    }
    env["DATA_DIR"] = str(data_dir)
    env.update(extra)
    return env


def run_cli(
    *args: str, env: dict[str, str], cwd: Path, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    # cwd is a scratch directory so no stray `.env` of the checkout is read.
    return subprocess.run(
        [*CLI, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def mint(data_dir: Path, cwd: Path, user: str, *extra: str) -> str:
    done = run_cli("token", user, *extra, env=user_env(data_dir), cwd=cwd)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    token = lines[0].strip()
    assert token.count(".") == 2, token
    return token


async def accepted(base_url: str, token: str) -> int:
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
        return (await http.get("/api/chat/sessions", headers=bearer(token))).status_code


async def ws_authenticated(ws_base: str, token: str) -> bool:
    async with websockets.connect(f"{ws_base}/ws/sess_none?token={token}") as ws:
        try:
            await asyncio.wait_for(ws.recv(), 5)
        except websockets.ConnectionClosed as exc:
            # Authenticated, so the refusal is about the (unknown) session, not the token.
            return exc.rcvd is not None and exc.rcvd.code == 4404
    return False


def test_help_lists_the_commands(tmp_path: Path) -> None:
    done = run_cli("--help", env=user_env(tmp_path), cwd=tmp_path)
    assert done.returncode == 0
    for command in ("serve", "migrate", "token"):
        assert command in done.stdout


def test_version(tmp_path: Path) -> None:
    from chatservice import __version__

    done = run_cli("--version", env=user_env(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"chat-service {__version__}"


def test_token_refuses_to_invent_a_secret(tmp_path: Path) -> None:
    """A secret the server does not have would mint tokens it rejects: one line, no file."""
    data_dir = tmp_path / "data"
    done = run_cli("token", "alice", env=user_env(data_dir), cwd=tmp_path)
    assert done.returncode == 2
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert str(data_dir) in lines[0] and "chat-service serve" in lines[0]
    assert "Traceback" not in done.stderr
    assert not (data_dir / "jwt_secret").exists()


async def test_token_from_cli_is_accepted_by_a_server_on_the_same_data_dir(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    # JWT_SECRET_KEY empty = not set: the server must generate and use its own secret.
    server = start_server(data_dir, JWT_SECRET_KEY="")
    try:
        secret_file = data_dir / "jwt_secret"
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
        secret = secret_file.read_text().strip()
        assert len(secret) >= 32
        token = mint(data_dir, tmp_path, "alice")
        assert await accepted(server.base_url, token) == 200
        assert await ws_authenticated(server.ws_url, token)
        # Claims given on the command line reach the server.
        named = mint(data_dir, tmp_path, "bob", "--name", "Bob B")
        async with httpx.AsyncClient(base_url=server.base_url, headers=bearer(named)) as http:
            created = await http.post("/api/chat/sessions", json={"title": "mine"})
            assert created.status_code == 201
            assert created.json()["user_id"] == "bob"
            detail = await http.get(f"/api/chat/sessions/{created.json()['session_id']}")
            assert detail.json()["members"][0]["display_name"] == "Bob B"
        # The server did not fall back to any other secret.
        other = tmp_path / "other"
        other.mkdir()
        (other / "jwt_secret").write_text("another-secret-of-at-least-thirty-two-bytes")
        assert await accepted(server.base_url, mint(other, tmp_path, "alice")) == 401
        assert await accepted(server.base_url, TokenCodec(TEST_SECRET).issue("alice")) == 401
        # Minting never rewrites the secret.
        assert secret_file.read_text().strip() == secret
        # `serve` created and migrated the embedded SQLite database in DATA_DIR.
        assert (data_dir / "chat.db").exists()
        # --ttl: a short-lived token expires.
        minted_at = time.monotonic()
        short = mint(data_dir, tmp_path, "carol", "--ttl", "3")
        assert await accepted(server.base_url, short) == 200
        await asyncio.sleep(max(0.0, minted_at + 4.2 - time.monotonic()))
        assert await accepted(server.base_url, short) == 401
    finally:
        server.stop()


async def test_default_data_dir_is_shared_by_serve_and_token_from_any_directory(
    tmp_path: Path,
) -> None:
    """No DATA_DIR: both commands use the per-user data directory, wherever they run."""
    xdg = tmp_path / "xdg"
    env = user_env(tmp_path, XDG_DATA_HOME=str(xdg), JWT_SECRET_KEY="")
    del env["DATA_DIR"]
    server_dir, other_dir = tmp_path / "server-cwd", tmp_path / "elsewhere"
    server_dir.mkdir()
    other_dir.mkdir()
    process, base_url = _serve_until_ready(env, server_dir, tmp_path / "serve.out")
    try:
        data_dir = xdg / "chat-service"
        assert (data_dir / "jwt_secret").exists() and (data_dir / "chat.db").exists()
        assert not any(server_dir.iterdir()), "nothing is written to the working directory"
        done = run_cli("token", "alice", env=env, cwd=other_dir)
        assert done.returncode == 0, done.stderr
        assert await accepted(base_url, done.stdout.strip()) == 200
        # The start-up banner says where things are and what to do next.
        printed = (tmp_path / "serve.out").read_text()
        from chatservice import __version__

        assert f"chat-service {__version__} on {base_url}" in printed
        assert f"data:     {data_dir}" in printed
        assert f"secret:   {data_dir / 'jwt_secret'}" in printed
        assert "token alice" in printed
        # Alembic's preamble is not printed (it used to appear twice per start).
        assert "Context impl" not in printed and "Will assume" not in printed
        assert "Running upgrade" in printed
    finally:
        process.terminate()
        process.wait(15)


def _serve_until_ready(
    env: dict[str, str], cwd: Path, output: Path
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    with output.open("wb") as out:
        process = subprocess.Popen(
            [*CLI, "serve", "--port", str(port)], env=env, cwd=cwd, stdout=out, stderr=out
        )
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, output.read_text()
        try:
            if httpx.get(f"{base_url}/readyz", timeout=1).status_code == 200:
                return process, base_url
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise AssertionError(f"server did not become ready:\n{output.read_text()}")


async def test_server_first_then_token(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    server = start_server(data_dir, JWT_SECRET_KEY="")
    try:
        secret_file = data_dir / "jwt_secret"
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
        token = mint(data_dir, tmp_path, "alice")
        assert await accepted(server.base_url, token) == 200
    finally:
        server.stop()


def test_sample_secret_is_refused_with_one_line(tmp_path: Path) -> None:
    env = user_env(tmp_path / "data", JWT_SECRET_KEY=SAMPLE_JWT_SECRET)
    for args in (("serve", "--port", str(free_port())), ("token", "alice")):
        done = run_cli(*args, env=env, cwd=tmp_path, timeout=30)
        assert done.returncode != 0, (args, done.stdout, done.stderr)
        lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        assert len(lines) == 1, (args, lines)
        assert "JWT_SECRET_KEY" in lines[0]
        assert "DEBUG" in lines[0]
        assert "Traceback" not in done.stderr


async def test_sample_secret_is_allowed_with_debug(tmp_path: Path) -> None:
    server = start_server(tmp_path / "data", JWT_SECRET_KEY=SAMPLE_JWT_SECRET, DEBUG="true")
    try:
        token = TokenCodec(SAMPLE_JWT_SECRET).issue("dev")
        assert await accepted(server.base_url, token) == 200
    finally:
        server.stop()


def test_migrate_on_a_fresh_sqlite_database_prints_the_revision(tmp_path: Path) -> None:
    db_path = tmp_path / "fresh" / "chat.db"
    db_path.parent.mkdir()
    env = user_env(tmp_path / "data", DATABASE_URL=f"sqlite:///{db_path}")
    head = head_revision()
    assert head
    for _ in range(2):  # and running it again is harmless
        done = run_cli("migrate", env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert head in done.stdout
    with sqlite3.connect(db_path) as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [(head,)]
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    assert {"chat_sessions", "chat_messages", "chat_participants", "agents"} <= tables


@pytest.fixture
def empty_postgres() -> Iterator[str]:
    """A PostgreSQL database that exists but was never migrated; dropped afterwards."""
    name = f"chatservice_e2e_unmigrated_{uuid.uuid4().hex[:8]}"
    asyncio.run(_create_database(name))
    try:
        yield _with_database(POSTGRES_ADMIN_URL, name)
    finally:
        asyncio.run(_drop_database(name))


def _serve_until_exit(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_cli("serve", "--port", str(free_port()), env=env, cwd=cwd, timeout=60)


def test_serve_refuses_an_unmigrated_postgres_database(tmp_path: Path, empty_postgres: str) -> None:
    env = user_env(tmp_path / "data", DATABASE_URL=empty_postgres, JWT_SECRET_KEY=TEST_SECRET)
    started = time.monotonic()
    done = _serve_until_exit(env, tmp_path)
    assert time.monotonic() - started < 60
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "chat-service migrate" in output, output

    # Following the advice works.
    migrated = run_cli("migrate", env=env, cwd=tmp_path)
    assert migrated.returncode == 0, migrated.stderr
    assert str(head_revision()) in migrated.stdout
    server = start_server(tmp_path / "data2", empty_postgres)
    try:
        assert httpx.get(f"{server.base_url}/readyz").json()["status"] == "ready"
    finally:
        server.stop()


def test_serve_explains_an_unmigrated_database_without_a_traceback(
    tmp_path: Path, empty_postgres: str
) -> None:
    """The refusal is an operator message, like the sample-secret one, not a crash dump."""
    env = user_env(tmp_path / "data", DATABASE_URL=empty_postgres, JWT_SECRET_KEY=TEST_SECRET)
    done = _serve_until_exit(env, tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    if "Traceback" in output:
        pytest.fail(
            "`chat-service serve` refused the unmigrated database with a traceback in its "
            f"log instead of a one-line error (exit code {done.returncode}); last line: "
            f"{output.strip().splitlines()[-1][:200]}"
        )
    messages = []
    for line in output.splitlines():
        try:
            messages.append(str(json.loads(line).get("message", "")))
        except ValueError:
            messages.append(line)
    assert any("chat-service migrate" in m and "\n" not in m.strip() for m in messages), messages
