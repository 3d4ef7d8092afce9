"""Composition root: the only place that picks implementations and wires them together."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from chatservice import __version__
from chatservice.api import errors, health, messages, sessions, ws
from chatservice.api.limits import BodyLimitMiddleware
from chatservice.auth import TokenCodec
from chatservice.bus.memory import MemoryBus
from chatservice.components import Components
from chatservice.config import Settings
from chatservice.realtime.connection import CLOSE_GOING_AWAY
from chatservice.realtime.hub import Hub
from chatservice.services.messages import MessageService
from chatservice.services.sessions import SessionService
from chatservice.services.typing import TypingService
from chatservice.store.database import Database
from chatservice.store.messages import MessageStore
from chatservice.store.sessions import SessionStore

log = logging.getLogger(__name__)


def build_components(settings: Settings) -> Components:
    database = Database(
        settings.effective_database_url,
        pool_size=settings.database_pool_size,
        max_overflow=settings.database_max_overflow,
    )
    bus = MemoryBus()
    session_service = SessionService(SessionStore(database), bus)
    message_service = MessageService(
        session_service,
        MessageStore(database),
        bus,
        max_content_bytes=settings.ws_message_size_limit,
    )
    return Components(
        settings=settings,
        database=database,
        bus=bus,
        tokens=TokenCodec(settings.resolve_jwt_secret(), settings.jwt_algorithm),
        sessions=session_service,
        messages=message_service,
        typing=TypingService(bus),
        hub=Hub(bus, message_service),
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    parts = build_components(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await parts.database.check_schema()
        await parts.bus.start()
        log.info(
            "chat-service %s ready (database: %s)",
            __version__,
            "sqlite" if parts.database.is_sqlite else "postgresql",
        )
        try:
            yield
        finally:
            await parts.hub.close_all(CLOSE_GOING_AWAY, "server shutting down")
            await parts.bus.close()
            await parts.database.close()

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
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_request_body)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
        )
    for module in (health, sessions, messages, ws):
        app.include_router(module.router)
    return app
