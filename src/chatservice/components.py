"""The running service's parts, as the composition root (`app.py`) wired them."""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from chatservice.auth import TokenCodec
from chatservice.blobs.base import BlobStore
from chatservice.bus.base import Bus
from chatservice.config import Settings
from chatservice.realtime.hub import Hub
from chatservice.services.agents import AgentService
from chatservice.services.archives import ArchiveService
from chatservice.services.files import FileService
from chatservice.services.messages import MessageService
from chatservice.services.scheduler import Scheduler
from chatservice.services.sessions import SessionService
from chatservice.services.streams import StreamService
from chatservice.services.typing import TypingService
from chatservice.store.database import Database
from chatservice.store.history import MessageHistory


@dataclass(slots=True)
class Components:
    settings: Settings
    database: Database
    bus: Bus
    redis: Redis | None
    tokens: TokenCodec
    sessions: SessionService
    messages: MessageService
    typing: TypingService
    agents: AgentService
    streams: StreamService
    history: MessageHistory
    hub: Hub
    blobs: BlobStore
    files: FileService
    archives: ArchiveService
    scheduler: Scheduler
