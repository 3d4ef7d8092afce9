"""`chat-service serve | migrate | token`."""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Annotated

import typer

from chatservice.config import ConfigError, Settings

cli = typer.Typer(add_completion=False, no_args_is_help=True, help="Real-time chat backend.")


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

    from chatservice.app import create_app
    from chatservice.logs import configure_logging
    from chatservice.store import migrate

    settings = _settings()
    configure_logging(settings.log_level)
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
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port or settings.service_port,
        log_config=None,
        ws_max_size=max(4 * limit, 1_048_576),
        ws_ping_interval=settings.ws_heartbeat_interval,
        ws_ping_timeout=settings.ws_connection_timeout,
        timeout_graceful_shutdown=5,
    )


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
    """Print a development JWT signed with the configured secret."""
    from chatservice.auth import TokenCodec

    settings = _settings()
    try:
        secret = settings.resolve_jwt_secret()
    except ConfigError as exc:
        _fail(str(exc))
    codec = TokenCodec(secret, settings.jwt_algorithm)
    typer.echo(codec.issue(user_id, ttl_seconds=ttl, name=name, roles=role or None))


def main() -> None:
    logging.captureWarnings(True)
    cli(prog_name="chat-service")


if __name__ == "__main__":
    main()
    sys.exit(0)
