"""`chat-service serve | migrate | token`."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer

from chatservice import __version__
from chatservice.config import ConfigError, Settings, default_data_dir

cli = typer.Typer(add_completion=False, no_args_is_help=True, help="Real-time chat backend.")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"chat-service {__version__}")
        raise typer.Exit()


@cli.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    """Real-time chat backend for people and AI agents."""


def _settings() -> Settings:
    try:
        return Settings()
    except Exception as exc:  # pydantic's message names the variable and the problem
        typer.echo(f"error: invalid configuration: {exc}", err=True)
        raise typer.Exit(2) from exc


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@cli.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int | None, typer.Option(help="Port (default: SERVICE_PORT).")] = None,
) -> None:
    """Run the service. On the embedded SQLite database, pending migrations run first."""
    import uvicorn

    from chatservice.api.direct_frames import DirectFramesProtocol
    from chatservice.api.header_limit import bounded_http_protocol
    from chatservice.api.server import DrainingServer
    from chatservice.api.socket_routes import SocketRoutes
    from chatservice.app import create_app
    from chatservice.logs import configure_logging
    from chatservice.store import migrate

    settings = _settings()
    configure_logging(settings.log_level)
    _private_files()
    try:
        settings.resolve_jwt_secret()
    except ConfigError as exc:
        _fail(str(exc))
    if settings.is_sqlite:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        migrate.upgrade(settings.effective_database_url)
    else:
        problem = asyncio.run(_database_problem(settings))
        if problem:
            _fail(problem)
    if settings.redis_url:
        problem = asyncio.run(_redis_problem(settings.redis_url))
        if problem:
            _fail(problem)
    problem = asyncio.run(_blob_store_problem(settings))
    if problem:
        _fail(problem)
    limit = settings.ws_message_size_limit
    typer.echo(_start_banner(settings, host, port or settings.service_port))
    app = create_app(settings)
    config = uvicorn.Config(
        SocketRoutes(app),
        host=host,
        port=port or settings.service_port,
        http=bounded_http_protocol(settings.max_request_header_bytes),
        ws=DirectFramesProtocol,
        log_config=None,
        ws_max_size=max(4 * limit, 1_048_576),
        ws_ping_interval=settings.ws_heartbeat_interval,
        ws_ping_timeout=settings.ws_connection_timeout,
        ws_per_message_deflate=settings.ws_per_message_deflate,
        timeout_graceful_shutdown=5,
        # Nothing here reads a client's address or scheme, and believing a peer's
        # X-Forwarded-* headers is a gateway trust an operator has not configured.
        proxy_headers=False,
    )
    parts = app.state.components

    async def drain() -> None:
        await parts.streams.drain(settings.agent_shutdown_grace)
        await parts.hub.settle()  # the answers' last frames reach their clients

    # Everything built so far (modules, the app, its tables and compiled statements) lives
    # as long as the process: out of the collector's sight, full collections stay short.
    # A younger generation collected less often trades a little memory for fewer pauses
    # under the per-message garbage of a busy socket.
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    DrainingServer(config, drain).run()


def _private_files() -> None:
    """Everything the service creates (the SQLite database and its -wal/-shm files, the
    secret, local files and thumbnails, the data directory itself) is readable by its own
    user only: messages are nobody else's business on a shared machine."""
    os.umask(0o077)


def _start_banner(settings: Settings, host: str, port: int) -> str:
    """What a newcomer needs after `serve`: where it listens, where its state is, what next."""
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    url = f"http://{shown_host}:{port}"
    database = (
        _safe_url(settings.database_url)
        if settings.database_url
        else f"SQLite {settings.data_dir / 'chat.db'}"
    )
    secret = (
        "JWT_SECRET_KEY (from the environment)"
        if settings.jwt_secret_key
        else f"{settings.jwt_secret_file} (generated on first start, mode 0600)"
    )
    token_command = f"{_own_command()} token alice"
    if "DATA_DIR" in os.environ or settings.data_dir != default_data_dir():
        token_command = f"DATA_DIR={settings.data_dir} {token_command}"
    return "\n".join(
        (
            f"chat-service {__version__} on {url}"
            + (f" (listening on {host})" if shown_host != host else ""),
            f"  data:     {settings.data_dir}",
            f"  database: {database}",
            f"  secret:   {secret}",
            f"  token:    {token_command}   # a development JWT for user alice",
            f'  try:      curl -H "Authorization: Bearer $TOKEN" {url}/api/chat/sessions',
            f"  realtime: ws://{shown_host}:{port}/ws/<session_id>?token=$TOKEN",
        )
    )


def _own_command() -> str:
    """How to run this program again: its name when the shell finds it, else its path."""
    invoked = Path(sys.argv[0])
    if invoked.suffix == ".py":  # started as `python -m chatservice.cli`
        return f"{sys.executable} -m chatservice.cli"
    if shutil.which(invoked.name) and Path(shutil.which(invoked.name) or "").samefile(invoked):
        return invoked.name
    return str(invoked.resolve()) if invoked.exists() else "chat-service"


async def _database_problem(settings: Settings) -> str | None:
    """Why the configured database cannot serve yet, in one line; None when it can."""
    from chatservice.store.database import Database, SchemaOutOfDate

    database = Database(settings.effective_database_url, pool_size=1, max_overflow=0)
    try:
        await database.check_schema()
    except SchemaOutOfDate as exc:
        return str(exc)
    except Exception as exc:  # unreachable server, bad credentials, unknown database
        return f"cannot use the database at {_safe_url(settings.database_url)}: {exc}"
    finally:
        await database.close()
    return None


async def _redis_problem(url: str) -> str | None:
    from redis.asyncio import Redis

    try:
        client = Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
    except ValueError as exc:  # e.g. no redis:// scheme
        return f"REDIS_URL is not a Redis URL ({_safe_url(url)}): {exc}"
    try:
        await client.ping()
    except Exception as exc:
        return f"cannot reach Redis at {_safe_url(url)}: {exc}"
    finally:
        await client.aclose()
    return None


async def _blob_store_problem(settings: Settings) -> str | None:
    """Why files cannot be stored (unwritable directory, unreachable or refused S3)."""
    from chatservice.app import build_blob_store

    store = build_blob_store(settings)
    where = (
        f"S3 bucket {settings.s3_bucket_name!r}"
        + (f" at {settings.s3_endpoint_url}" if settings.s3_endpoint_url else "")
        if settings.file_storage_type == "s3"
        else f"file storage at {settings.effective_file_storage_path}"
    )
    try:
        await asyncio.wait_for(store.start(), 20)
    except Exception as exc:
        return f"cannot use the {where}: {str(exc) or type(exc).__name__}"
    finally:
        await store.close()
    return None


def _safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "(unparseable URL)"


@cli.command("migrate")
def migrate_command() -> None:
    """Apply pending schema migrations to DATABASE_URL."""
    from chatservice.store import migrate

    settings = _settings()
    _private_files()
    if settings.is_sqlite:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        migrate.upgrade(settings.effective_database_url)
    except Exception as exc:
        _fail(f"migration of {_safe_url(settings.effective_database_url)} failed: {exc}")
    typer.echo(f"database at revision {migrate.head_revision()}")


@cli.command()
def token(
    user_id: Annotated[str, typer.Argument(help="The user id to put in `sub`.")],
    ttl: Annotated[int, typer.Option(help="Lifetime in seconds.")] = 86_400,
    name: Annotated[str | None, typer.Option(help="Display name claim.")] = None,
    role: Annotated[list[str] | None, typer.Option(help="Role claim (repeatable).")] = None,
) -> None:
    """Print a development JWT signed with the server's secret (JWT_SECRET_KEY or DATA_DIR)."""
    from chatservice.auth import TokenCodec

    settings = _settings()
    try:
        secret = settings.existing_jwt_secret()
    except ConfigError as exc:
        _fail(str(exc))
    codec = TokenCodec(secret, settings.jwt_algorithm)
    typer.echo(codec.issue(user_id, ttl_seconds=ttl, name=name, roles=role or None))


@cli.command()
def loadtest(
    scenario: Annotated[str, typer.Argument(help="fanout, chat or idle.")] = "fanout",
    url: Annotated[
        str | None, typer.Option(help="The server (default: http://127.0.0.1:SERVICE_PORT).")
    ] = None,
    rooms: Annotated[int, typer.Option(min=1, help="Sessions.")] = 10,
    members: Annotated[int, typer.Option(min=1, help="Connected members per session.")] = 50,
    senders: Annotated[int, typer.Option(min=1, help="Senders per session (chat).")] = 1,
    window: Annotated[
        int, typer.Option(min=1, help="Unacknowledged messages per sender (fanout).")
    ] = 20,
    rate: Annotated[float, typer.Option(min=0.01, help="Messages/s per sender (chat).")] = 2.0,
    duration: Annotated[float, typer.Option(min=0.1, help="Seconds of sending.")] = 10.0,
    drain: Annotated[float, typer.Option(min=0, help="Seconds to wait for the tail.")] = 10.0,
    size: Annotated[int, typer.Option(min=1, help="Characters per message.")] = 64,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Drive a running server with chat traffic; print deliveries/s, latency, loss, order.

    Tokens are signed with the server's secret (JWT_SECRET_KEY, or DATA_DIR's), so run it
    where `chat-service token` works. Exit status 1 when anything was lost or out of order.
    """
    import orjson
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from chatservice.auth import TokenCodec
    from chatservice.loadtest import SCENARIOS, LoadTest, Plan

    if scenario not in SCENARIOS:
        _fail(f"scenario must be one of {', '.join(SCENARIOS)}")
    settings = _settings()
    try:
        codec = TokenCodec(settings.existing_jwt_secret(), settings.jwt_algorithm)
    except ConfigError as exc:
        _fail(str(exc))
    plan = Plan(
        scenario,
        rooms=rooms,
        members=members,
        senders=min(senders, members),
        window=window,
        rate=rate,
        duration=duration,
        drain=drain,
        size=size,
    )
    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description:>8}"),
        BarColumn(),
        TextColumn("{task.completed:,.0f}/{task.total:,.0f}"),
        TimeElapsedColumn(),
        console=console,
        transient=as_json,
    ) as progress:
        phases: dict[str, TaskID] = {}

        def report(phase: str, done: float, total: float) -> None:
            if phase not in phases:
                phases[phase] = progress.add_task(phase, total=total)
            progress.update(phases[phase], completed=done, total=total)

        base_url = url or f"http://127.0.0.1:{settings.service_port}"
        try:
            results = asyncio.run(LoadTest(base_url, codec, plan, report).run())
        except (OSError, RuntimeError) as exc:
            _fail(f"load test against {base_url} failed: {exc}")
    summary = results.summary()
    if as_json:
        typer.echo(orjson.dumps(summary).decode())
    else:
        table = Table(title=f"{scenario}: {rooms} rooms x {members} members")
        table.add_column("measure")
        table.add_column("value", justify="right")
        for key, value in summary.items():
            if key != "errors":
                table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
        Console().print(table)
        for error in summary["errors"]:
            typer.echo(f"error: {error}", err=True)
    if results.lost or results.out_of_order or results.duplicates:
        raise typer.Exit(1)


def main() -> None:
    logging.captureWarnings(True)
    cli(prog_name="chat-service")


if __name__ == "__main__":
    main()
    sys.exit(0)
