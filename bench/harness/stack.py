"""Everything one measurement runs on, started in order and torn down whatever happens.

    with started(backend="postgres", names=("serverA", "serverB"), redis=True) as stack:
        ...  # stack.servers, stack.meter(), stack.problems()

Order: a temporary work directory, the PostgreSQL database (created, migrated), the
benchmark's own redis-server, helper processes (a fake upstream, an S3 server: whatever
the script passes, each adding to the servers' environment), then the servers, all with
one environment. Teardown runs in reverse, on success, errors and Ctrl-C alike.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from harness.machine import code_version
from harness.meter import Meter
from harness.postgres import ADMIN_URL, database, database_url, migrate
from harness.redis_server import RedisServer, start_redis
from harness.server import BASE_SCRUB, PYTHON_CLI, Server, server_env, start_server


class Helper(Protocol):
    """A process the servers use, started before them."""

    name: str

    @property
    def pid(self) -> int: ...

    def env(self) -> dict[str, str]:
        """What the servers' environment needs to use it."""
        ...

    def stop(self) -> None: ...


@dataclass
class Stack:
    workdir: Path
    servers: list[Server] = field(default_factory=list)
    database: str | None = None
    redis: RedisServer | None = None
    helpers: list[Helper] = field(default_factory=list)
    code: str = ""  # code_version() at the start, and any change during the run

    def pids(self) -> dict[str, int]:
        """This run's processes by the names the reports give them."""
        found = {server.name: server.pid for server in self.servers}
        found.update({helper.name: helper.pid for helper in self.helpers})
        if self.redis is not None:
            found["redis"] = self.redis.pid
        found["client"] = os.getpid()
        return found

    def meter(self) -> Meter:
        return Meter(self.pids(), self.database, self.servers)

    def problems(self) -> list[str]:
        """Servers that exited or logged errors, and a redis-server that exited."""
        found = []
        for server in self.servers:
            if server.process.poll() is not None:
                found.append(f"{server.name} exited with {server.process.returncode}")
            errors = server.errors()
            if errors:
                found.append(f"{server.name} logged {len(errors)} errors, first: {errors[0]}")
        if self.redis is not None and self.redis.process.poll() is not None:
            found.append(f"redis-server exited with {self.redis.process.returncode}")
        return found


@contextlib.contextmanager
def workdir(prefix: str, keep: bool = False) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
    try:
        yield path
    finally:
        if keep:
            print(f"kept {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def started(
    *,
    backend: str = "sqlite",
    names: Sequence[str] = ("server",),
    redis: bool = False,
    helpers: Sequence[Callable[[Path], Helper]] = (),
    env: Mapping[str, str] | None = None,
    scrub: Sequence[str] = BASE_SCRUB,
    max_connections: int = 1000,
    db_pool: int | None = None,
    db_overflow: int = 0,
    program: Sequence[str] = PYTHON_CLI,
    profile: Callable[[str], Path | None] | None = None,
    admin_url: str = ADMIN_URL,
    db_prefix: str = "chatservice_bench",
    prefix: str = "chat-bench",
    keep: bool = False,
    verbose: bool = False,
) -> Iterator[Stack]:
    """`names`: one server each, sharing the database, the bus and DATA_DIR (SQLite serves
    one). `env` comes after the settings of `server_env`, the helpers' after `env`.
    `profile(name)`: where that server's cProfile goes, or None. `keep`: the work
    directory (server logs) stays. `verbose`: on failure, the log tails of servers still
    running too."""
    with contextlib.ExitStack() as teardown:
        stack = Stack(teardown.enter_context(workdir(prefix, keep)))
        url = None
        if backend == "postgres":
            stack.database = teardown.enter_context(database(db_prefix, admin_url=admin_url))
            url = database_url(stack.database, admin_url)
        if redis:
            stack.redis = start_redis(stack.workdir)
            teardown.callback(stack.redis.stop)
        for start in helpers:
            helper = start(stack.workdir)
            teardown.callback(helper.stop)
            stack.helpers.append(helper)
        environment = server_env(
            stack.workdir,
            database_url=url,
            redis_url=stack.redis.url if stack.redis else None,
            max_connections=max_connections,
            db_pool=db_pool,
            db_overflow=db_overflow,
            scrub=scrub,
            extra=env,
        )
        for helper in stack.helpers:
            environment.update(helper.env())
        if url:
            migrate(stack.workdir, environment, program)
        stack.code = code_version()

        @teardown.callback
        def stop_servers() -> None:
            for server in stack.servers:
                server.stop()

        try:
            for name in names:
                where = profile(name) if profile else None
                server = start_server(
                    stack.workdir, environment, name=name, program=program, profile=where
                )
                stack.servers.append(server)
            yield stack
        except BaseException:
            for server in stack.servers:
                errors = server.errors()
                if errors:
                    print(
                        f"{server.name} logged {len(errors)} errors, first: {errors[0]}",
                        file=sys.stderr,
                    )
                if server.process.poll() is not None or verbose:
                    print(f"{server.name} log (tail):\n{server.log_tail()}", file=sys.stderr)
            raise
        after = code_version()
        if after != stack.code:
            stack.code += f" (changed to {after} during the run)"
