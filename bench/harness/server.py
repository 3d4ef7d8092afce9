"""A `chat-service serve` process: its environment, start, readiness, log and stop.

Every server this process starts signs tokens with SECRET, so the load generator mints
its own (harness.clients). A server runs in its work directory (no stray `.env` from
wherever the script was started), writes its log to `<workdir>/<name>.log`, and gets
SIGTERM if the benchmark dies without stopping it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson

from harness.machine import HOST, free_port

SECRET = "bench-secret-" + uuid.uuid4().hex
PYTHON_CLI = (sys.executable, "-m", "chatservice.cli")
# The caller's settings that must not change a run: those of the database and the bus it
# asks for, whatever the shell has. Scripts add the prefixes of what else they set.
BASE_SCRUB = ("DEBUG", "DATABASE_", "REDIS_")
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0


def die_with_parent() -> None:
    """In a child, before exec: get SIGTERM when the benchmark dies (Linux's PDEATHSIG)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def stop_process(
    process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, wait: float = 10.0
) -> None:
    """Send `sig`, and kill the process if it has not ended within `wait` s."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(wait)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def server_env(
    workdir: Path,
    *,
    database_url: str | None = None,
    redis_url: str | None = None,
    max_connections: int = 1000,
    db_pool: int | None = None,
    db_overflow: int = 0,
    scrub: Sequence[str] = BASE_SCRUB,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """This process's environment less `scrub`, then the run's settings, then `extra`.

    No rate limit: it would cap a sender long before the server's capacity. Without a
    DATABASE_URL the server uses SQLite in DATA_DIR; without REDIS_URL, the in-process bus.
    """
    env = {name: value for name, value in os.environ.items() if not name.startswith(tuple(scrub))}
    env.update(
        {
            "DATA_DIR": str(workdir / "data"),
            "JWT_SECRET_KEY": SECRET,
            "LOG_LEVEL": "WARNING",
            "RATE_LIMIT_ENABLED": "false",
            "WS_MAX_CONNECTIONS": str(max_connections),
        }
    )
    if database_url:
        env["DATABASE_URL"] = database_url
        if db_pool is not None:
            # A fixed pool per instance: two instances at the default 20 + 40 could open
            # 120 connections against PostgreSQL's default max_connections=100.
            env["DATABASE_POOL_SIZE"] = str(db_pool)
            env["DATABASE_MAX_OVERFLOW"] = str(db_overflow)
    if redis_url:
        env["REDIS_URL"] = redis_url
    env.update(extra or {})
    return env


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{HOST}:{self.port}"

    def log_lines(self) -> list[str]:
        try:
            return self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_lines()[-lines:])

    def errors(self) -> list[str]:
        """ERROR/CRITICAL lines of the (JSON) log, one line each: the message and the last
        line of its traceback, which says what failed."""
        found: list[str] = []
        for line in self.log_lines():
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("level") in ("ERROR", "CRITICAL"):
                exc = str(record.get("exception") or "").strip().splitlines()
                text = str(record.get("message", "")).strip()
                found.append(f"{text} {exc[-1] if exc else ''}".strip()[:300])
        return found

    def stop(self) -> None:
        # SIGINT, like Ctrl-C: uvicorn shuts down gracefully and re-raises it, so a
        # profiled server still writes its profile (SIGTERM would end it silently).
        stop_process(self.process, signal.SIGINT, STOP_TIMEOUT)


def start_server(
    workdir: Path,
    env: Mapping[str, str],
    *,
    name: str = "server",
    program: Sequence[str] = PYTHON_CLI,
    profile: Path | None = None,
    pin: str | None = None,
) -> Server:
    """Start `program serve` on a free port and wait for /readyz.

    `profile`: run it under cProfile (with the default program), written when it stops.
    `pin`: a `taskset -c` CPU list.
    """
    port = free_port()
    command = [*program, "serve", "--host", HOST, "--port", str(port)]
    if profile is not None:
        command[1:1] = ["-m", "cProfile", "-o", str(profile)]
    if pin is not None:
        command = ["taskset", "-c", pin, *command]
    log_path = workdir / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            env=dict(env),
            cwd=workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
    server = Server(name, process, port, log_path)
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{server.log_tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.base_url}/readyz", timeout=2).status_code == 200:
                return server
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"{name} not ready within {READY_TIMEOUT}s:\n{server.log_tail()}")
