"""Plain types of the chat domain. No I/O here: everything else builds on these."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

JSON = dict[str, Any]

_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"


def new_id(prefix: str) -> str:
    """A prefixed, time-ordered id (`msg_01k…`): 48 bits of milliseconds, 80 random bits.

    This is the ULID layout in lower case; written here rather than taken from a package
    because it is twelve lines and ids are minted on the hottest path of the service.
    """
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return f"{prefix}_{''.join(reversed(chars))}"


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """An aware UTC time; SQLite hands back naive times that are UTC by construction."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def isoformat(moment: datetime | None) -> str | None:
    """ISO 8601 with a `Z`, as the A2G-compatible REST contract writes times; naive times are
    UTC."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


class SessionKind(StrEnum):
    AGENT = "agent"
    DIRECT = "direct"
    GROUP = "group"


class SessionStatus(StrEnum):
    SCHEDULED = "scheduled"
    ACTIVE = "active"
    ARCHIVED = "archived"
    DELETED = "deleted"


WRITABLE_STATUSES = (SessionStatus.SCHEDULED.value, SessionStatus.ACTIVE.value)


class ArchiveState(StrEnum):
    PENDING = "pending"  # ended; the transcript is not in the blob store yet
    DONE = "done"
    EMPTY = "empty"  # ended without messages: nothing to archive (as in the consultation chat)


class Role(StrEnum):
    OWNER = "owner"
    MEMBER = "member"


class SenderType(StrEnum):
    USER = "user"
    AGENT = "agent"
    SYSTEM = "system"


class MessageType(StrEnum):
    TEXT = "text"
    STREAM = "stream"
    FILE = "file"
    SYSTEM = "system"


@dataclass(slots=True, frozen=True)
class Principal:
    """Who is calling, as the bearer token says."""

    user_id: str
    name: str | None = None
    roles: tuple[str, ...] = ()
    # The token's `exp` (Unix time): long-lived connections end when their token does.
    expires_at: float | None = None


@dataclass(slots=True)
class Participant:
    session_id: str
    user_id: str
    role: str
    joined_at: datetime
    last_read_seq: int = 0
    display_name: str | None = None


@dataclass(slots=True)
class Agent:
    id: int
    name: str
    avatar_url: str | None
    backend: str
    settings: JSON = field(default_factory=dict)
    created_at: datetime | None = None


@dataclass(slots=True)
class Session:
    session_id: str
    trace_id: str
    user_id: str
    kind: str
    status: str
    title: str | None
    agent_id: int | None
    metadata: JSON | None
    created_at: datetime
    updated_at: datetime
    last_seq: int = 0
    started_at: datetime | None = None
    ended_at: datetime | None = None
    scheduled_at: datetime | None = None
    archive_state: str | None = None  # ArchiveState once ended
    archive_key: str | None = None
    archive_json_key: str | None = None
    archived_at: datetime | None = None
    snapshot_seq: int = 0


@dataclass(slots=True)
class Message:
    message_id: str
    session_id: str
    seq: int
    sender_type: str
    sender_id: str
    message_type: str
    content: str | None
    metadata: JSON | None
    created_at: datetime
    client_msg_id: str | None = None
    is_edited: bool = False
    edited_at: datetime | None = None
    tokens_used: int | None = None
    latency_ms: int | None = None


@dataclass(slots=True)
class FileRecord:
    """An uploaded file; `message_id` is None until a message carries it."""

    file_id: str
    session_id: str
    file_name: str
    file_type: str
    file_size: int
    storage_key: str
    uploaded_by: str
    uploaded_at: datetime
    thumbnail_key: str | None = None
    message_id: str | None = None
    deleted: bool = False

    @property
    def url(self) -> str:
        return f"/files/{self.file_id}"

    @property
    def thumbnail_url(self) -> str | None:
        return f"/files/{self.file_id}/thumb" if self.thumbnail_key else None

    def info(self) -> JSON:
        """`file_info` as the upload answer of the A2G-compatible REST contract and a file
        message's metadata carry it."""
        return {
            "file_id": self.file_id,
            "name": self.file_name,
            "type": self.file_type,
            "size": self.file_size,
            "url": self.url,
            "thumbnail_url": self.thumbnail_url,
        }


@dataclass(slots=True)
class SessionSummary:
    """One row of a user's session list."""

    session: Session
    agent_name: str | None
    last_message: str | None
    last_message_at: datetime | None
    unread_count: int


@dataclass(slots=True)
class SessionDetail:
    session: Session
    agent: Agent | None
    participants: list[Participant]
    message_count: int
    last_activity: datetime | None
    online: list[str] = field(default_factory=list)


@dataclass(slots=True)
class MessagePage:
    messages: list[Message]
    has_more: bool
    total: int


@dataclass(slots=True)
class SendResult:
    message: Message
    created: bool = True  # False when a retried client_msg_id returned the original


@dataclass(slots=True)
class Cursor:
    """A paging bound: a `seq` or a point in time."""

    seq: int | None = None
    moment: datetime | None = None

    @classmethod
    def parse(cls, raw: str) -> Cursor:
        text = raw.strip()
        if text.isascii() and text.isdigit():
            seq = int(text)
            if seq > 2**63 - 1:
                raise ValueError("seq is outside the signed 64-bit range")
            # seq columns are 32-bit; any larger cursor lies past every message.
            return cls(seq=min(seq, 2**31 - 1))
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace(" ", "+"))
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return cls(moment=moment)


@dataclass(slots=True)
class NewSession:
    """What a caller asks for when creating a session, already validated for types."""

    kind: str
    title: str | None = None
    agent_id: int | None = None
    metadata: JSON | None = None
    participants: list[str] = field(default_factory=list)
    scheduled_at: datetime | None = None
