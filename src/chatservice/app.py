"""Composition root: the only place that picks implementations and wires them together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator
from datetime import timedelta
from zoneinfo import ZoneInfo

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from redis.asyncio import BlockingConnectionPool, Redis

from chatservice import __version__
from chatservice.agents.base import AgentBackend
from chatservice.agents.demo import DemoAgent
from chatservice.agents.openai import OpenAIAgent
from chatservice.agents.policy import UpstreamPolicy
from chatservice.api import agents as agents_api
from chatservice.api import archives as archives_api
from chatservice.api import errors, health, messages, sessions
from chatservice.api import files as files_api
from chatservice.api import streams as streams_api
from chatservice.api.limits import BodyLimitMiddleware, RouteLimit
from chatservice.api.safety import ResponseSafety
from chatservice.auth import TokenCodec
from chatservice.blobs.base import BlobStore
from chatservice.blobs.local import LocalBlobStore
from chatservice.blobs.s3 import S3BlobStore
from chatservice.bus.base import Bus, Locks, Presence, RateLimiter, StreamBuffer
from chatservice.bus.memory import MemoryBus
from chatservice.bus.presence import MemoryPresence
from chatservice.bus.ratelimit import MemoryRateLimiter
from chatservice.bus.redis import RedisBus
from chatservice.bus.redis_presence import RedisPresence
from chatservice.bus.redis_ratelimit import RedisRateLimiter
from chatservice.bus.redis_streams import RedisLocks, RedisStreamBuffer
from chatservice.bus.streams import MemoryLocks, MemoryStreamBuffer
from chatservice.components import Components
from chatservice.config import Settings
from chatservice.domain import utcnow
from chatservice.publisher import Publisher
from chatservice.realtime.codec import CloseReason
from chatservice.realtime.hub import Hub
from chatservice.services.agents import AgentService
from chatservice.services.answers import Answerer, StreamLimits
from chatservice.services.archives import ArchiveService, ArchiveSettings
from chatservice.services.files import FileLimits, FileService
from chatservice.services.messages import MessageService
from chatservice.services.scheduler import Job, Scheduler
from chatservice.services.sessions import SessionService
from chatservice.services.streams import StreamService
from chatservice.services.typing import TypingService
from chatservice.store.agents import AgentStore
from chatservice.store.archives import ArchiveStore
from chatservice.store.database import Database
from chatservice.store.files import FileStore
from chatservice.store.history import MessageHistory
from chatservice.store.messages import MessageStore
from chatservice.store.sessions import SessionStore

log = logging.getLogger(__name__)

# An upload sent with attach=false that no message took up within this is removed.
UNATTACHED_UPLOAD_TTL = timedelta(hours=24)


def build_components(settings: Settings) -> Components:
    database = Database(
        settings.effective_database_url,
        pool_size=settings.database_pool_size,
        max_overflow=settings.database_max_overflow,
    )
    bus: Bus
    presence: Presence
    buffer: StreamBuffer
    locks: Locks
    limiter: RateLimiter | None = None
    redis: Redis | None = None
    if settings.redis_url:
        redis = Redis(
            connection_pool=BlockingConnectionPool.from_url(
                settings.redis_url,
                max_connections=settings.redis_max_connections,
                timeout=5,
                socket_connect_timeout=5,
                socket_keepalive=True,
            )
        )
        bus = RedisBus(redis)
        presence = RedisPresence(redis, settings.ws_connection_timeout, instance_id())
        buffer = RedisStreamBuffer(redis, settings.stream_buffer_ttl)
        locks = RedisLocks(redis)
        if settings.rate_limit_enabled:
            limiter = RedisRateLimiter(redis, settings.rate_limit_messages_per_minute)
    else:
        bus = MemoryBus()
        presence = MemoryPresence(settings.ws_connection_timeout)
        buffer = MemoryStreamBuffer(settings.stream_buffer_ttl)
        locks = MemoryLocks()
        if settings.rate_limit_enabled:
            limiter = MemoryRateLimiter(settings.rate_limit_messages_per_minute)
    publisher = Publisher(bus)
    session_service = SessionService(SessionStore(database), publisher, presence)
    message_store = MessageStore(database)
    message_service = MessageService(
        session_service,
        message_store,
        publisher,
        max_content_bytes=settings.ws_message_size_limit,
        rate_limiter=limiter,
    )
    agent_store = AgentStore(database)
    upstreams = UpstreamPolicy(
        default_base_url=settings.openai_base_url,
        allowed_base_urls=settings.agent_allowed_base_urls,
        allowed_key_envs=settings.agent_api_key_env_allowed,
    )
    backends: dict[str, AgentBackend] = {
        "demo": DemoAgent(settings.stream_chunk_size, settings.stream_delay_ms),
        "openai": OpenAIAgent(
            default_base_url=settings.openai_base_url,
            default_api_key=settings.openai_api_key,
            default_model=settings.openai_model,
            stall_timeout=settings.agent_stall_timeout,
            total_timeout=settings.agent_timeout,
            policy=upstreams,
        ),
    }
    stream_limits = StreamLimits(
        total_timeout=settings.agent_timeout,
        context_messages=settings.agent_context_messages,
        context_chars=settings.agent_context_chars,
        lease_seconds=settings.agent_lease_seconds,
    )
    stream_service = StreamService(
        sessions=session_service,
        store=message_store,
        answerer=Answerer(
            store=message_store,
            agents=agent_store,
            backends=backends,
            buffer=buffer,
            publisher=publisher,
            limits=stream_limits,
        ),
        buffer=buffer,
        locks=locks,
        bus=bus,
        limits=stream_limits,
    )
    blobs = build_blob_store(settings)
    file_store = FileStore(database)
    file_service = FileService(
        session_service,
        message_service,
        file_store,
        blobs,
        FileLimits(
            max_size=settings.max_file_size,
            allowed_types=frozenset(t.strip().lower() for t in settings.allowed_file_types),
            thumbnail_side=settings.thumbnail_size,
            max_image_pixels=settings.max_image_pixels,
        ),
    )
    archive_service = ArchiveService(
        session_service,
        message_store,
        file_store,
        ArchiveStore(database),
        blobs,
        ArchiveSettings(
            language=settings.transcript_language,
            zone=ZoneInfo(settings.transcript_timezone),
            snapshot_keep=settings.archive_snapshot_keep,
            idle_timeout=timedelta(seconds=settings.session_idle_timeout),
        ),
    )
    # Who is told what, in one place: a stored message may need an agent's answer; a
    # deleted message takes its files and snapshots along; an ended session is archived
    # (before `session_ended` goes out); a deleted one loses its snapshots.
    message_service.listeners.append(stream_service.on_message)
    message_service.delete_listeners.append(file_service.on_message_deleted)
    message_service.delete_listeners.append(archive_service.on_message_deleted)
    session_service.end_listeners.append(archive_service.on_ended)
    session_service.delete_listeners.append(archive_service.on_deleted)
    history = MessageHistory(message_store)
    scheduler = Scheduler(
        locks, maintenance_jobs(settings, archive_service, file_service, stream_service)
    )
    return Components(
        settings=settings,
        database=database,
        bus=bus,
        redis=redis,
        tokens=TokenCodec(settings.resolve_jwt_secret(), settings.jwt_algorithm),
        sessions=session_service,
        messages=message_service,
        typing=TypingService(publisher),
        agents=AgentService(agent_store, upstreams),
        streams=stream_service,
        history=history,
        hub=Hub(
            bus,
            history,
            presence,
            publisher,
            heartbeat_interval=min(
                settings.ws_heartbeat_interval, settings.ws_connection_timeout / 4
            ),
        ),
        blobs=blobs,
        files=file_service,
        archives=archive_service,
        scheduler=scheduler,
    )


def build_blob_store(settings: Settings) -> BlobStore:
    if settings.file_storage_type == "s3":
        return S3BlobStore(
            settings.s3_bucket_name,
            endpoint_url=settings.s3_endpoint_url or None,
            region=settings.s3_region or None,
        )
    return LocalBlobStore(settings.effective_file_storage_path)


def maintenance_jobs(
    settings: Settings, archives: ArchiveService, files: FileService, streams: StreamService
) -> list[Job]:
    async def housekeeping() -> int:
        ended = await archives.end_idle()
        retried = await archives.retry_pending()
        purged = await files.purge_unattached(utcnow() - UNATTACHED_UPLOAD_TTL)
        cleaned = await files.retry_blob_removal()
        return ended + retried + purged + cleaned

    return [
        Job("snapshots", settings.archive_snapshot_interval, archives.snapshot_changed),
        Job("housekeeping", settings.session_idle_check_interval, housekeeping),
        # A question whose instance died is answered within about one agent lease.
        Job("orphaned-questions", settings.agent_orphan_check_interval, streams.answer_orphans),
    ]


def instance_id() -> str:
    """Names this process in presence records, for operators reading Redis."""
    return f"{socket.gethostname()}:{os.getpid()}"


async def start_components(parts: Components) -> None:
    await parts.database.check_schema()
    if parts.redis is not None:
        # Open REDIS_POOL_SIZE connections now rather than on the first burst.
        await asyncio.gather(*(parts.redis.ping() for _ in range(parts.settings.redis_pool_size)))
    await parts.blobs.start()
    await parts.bus.start()
    await parts.hub.start()
    await parts.streams.start()
    await parts.streams.answer_orphans()  # e.g. those this instance left when it stopped
    await parts.scheduler.start()


async def stop_components(parts: Components) -> None:
    await parts.scheduler.stop()
    await parts.typing.close()
    await parts.streams.stop()
    await parts.hub.close_all(CloseReason.SERVICE_RESTART, "server shutting down")
    await parts.hub.stop()
    await parts.bus.close()
    if parts.redis is not None:
        await parts.redis.aclose()
    await parts.blobs.close()
    await parts.database.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    """The HTTP API, and the components' lifespan; an ASGI server runs it behind
    `SocketRoutes` (`api/socket_routes.py`), which serves the WebSocket endpoints."""
    settings = settings or Settings()
    parts = build_components(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await start_components(parts)
        log.info(
            "chat-service %s ready (database: %s)",
            __version__,
            "sqlite" if parts.database.is_sqlite else "postgresql",
        )
        try:
            yield
        finally:
            await stop_components(parts)

    app = FastAPI(
        title="chat-service",
        version=__version__,
        lifespan=lifespan,
        docs_url="/docs" if settings.debug else None,
        redoc_url=None,
        openapi_url="/openapi.json" if settings.debug else None,
    )
    app.state.components = parts
    errors.install(app)
    app.add_middleware(
        BodyLimitMiddleware,
        limit=settings.max_request_body,
        overrides=[
            RouteLimit(
                "POST",
                files_api.UPLOAD_PATH,
                settings.max_file_size + files_api.MULTIPART_OVERHEAD,
                f"file is larger than {settings.max_file_size} bytes (MAX_FILE_SIZE)",
            )
        ],
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
        )
    # Every answer gets its headers, and every exception the layers below let through
    # becomes a 500 here.
    app.add_middleware(ResponseSafety)
    for module in (
        health,
        sessions,
        messages,
        agents_api,
        streams_api,
        files_api,
        archives_api,
    ):
        app.include_router(module.router)
    return app
