"""The schema as SQLAlchemy Core tables: the columns, checks and indexes of the A2G-compatible
REST contract, plus this service's own.

Alembic migrations in `migrations/versions` are the authority on the database; these
definitions mirror the newest migration so queries can be written against them.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB

JSONType = JSON().with_variant(JSONB(), "postgresql")
Timestamp = DateTime(timezone=True)

metadata = MetaData()

agents = Table(
    "agents",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(100), nullable=False),
    Column("avatar_url", String(500)),
    Column("backend", String(20), nullable=False, server_default="demo"),
    Column("settings", JSONType),
    Column("created_at", Timestamp, nullable=False, server_default=func.now()),
)

chat_sessions = Table(
    "chat_sessions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("session_id", String(100), nullable=False, unique=True),
    Column("trace_id", String(100), unique=True),
    Column("user_id", String(100), nullable=False),
    Column("agent_id", Integer),
    Column("kind", String(10), nullable=False, server_default="group"),
    Column("title", String(200)),
    Column("status", String(20), nullable=False, server_default="active"),
    Column("metadata", JSONType, key="meta"),
    # "a|b" with the two user ids sorted: makes "one direct session per pair" a constraint.
    Column("direct_key", String(201), unique=True),
    # Highest seq handed out; the row lock on it serialises writers of one session.
    Column("last_seq", Integer, nullable=False, server_default="0"),
    # Seq of the newest user message the session's agent has answered (agent sessions).
    Column("agent_answered_seq", Integer, nullable=False, server_default="0"),
    Column("created_at", Timestamp, nullable=False, server_default=func.now()),
    Column("updated_at", Timestamp, nullable=False, server_default=func.now()),
    Column("scheduled_at", Timestamp),
    Column("started_at", Timestamp),
    Column("ended_at", Timestamp),
    Column("archive_state", String(10)),
    Column("archive_key", String(500)),
    Column("archive_json_key", String(500)),
    Column("archived_at", Timestamp),
    Column("snapshot_seq", Integer, nullable=False, server_default="0"),
    CheckConstraint(
        "status IN ('scheduled', 'active', 'archived', 'deleted')", name="check_status"
    ),
    CheckConstraint("kind IN ('agent', 'direct', 'group')", name="check_kind"),
    CheckConstraint("archive_state IN ('pending', 'done', 'empty')", name="check_archive_state"),
)
Index("idx_chat_sessions_user_id", chat_sessions.c.user_id)
Index("idx_chat_sessions_agent_id", chat_sessions.c.agent_id)
Index("idx_chat_sessions_trace_id", chat_sessions.c.trace_id)
Index("idx_chat_sessions_status", chat_sessions.c.status)
Index("idx_chat_sessions_updated_at", chat_sessions.c.updated_at)

chat_participants = Table(
    "chat_participants",
    metadata,
    Column(
        "session_id",
        String(100),
        ForeignKey("chat_sessions.session_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("user_id", String(100), primary_key=True),
    Column("role", String(20), nullable=False, server_default="member"),
    Column("display_name", String(200)),
    Column("joined_at", Timestamp, nullable=False, server_default=func.now()),
    Column("last_read_seq", Integer, nullable=False, server_default="0"),
    CheckConstraint("role IN ('owner', 'member')", name="check_role"),
)
Index("idx_chat_participants_user_id", chat_participants.c.user_id)

chat_messages = Table(
    "chat_messages",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column(
        "session_id",
        String(100),
        ForeignKey("chat_sessions.session_id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("message_id", String(100), nullable=False, unique=True),
    Column("seq", Integer, nullable=False),
    Column("sender_type", String(20), nullable=False),
    Column("sender_id", String(100), nullable=False),
    Column("message_type", String(20), nullable=False),
    Column("content", Text),
    Column("metadata", JSONType, key="meta"),
    Column("client_msg_id", String(100)),
    Column("tokens_used", Integer),
    Column("latency_ms", Integer),
    Column("is_edited", Boolean, nullable=False, server_default="false"),
    Column("edited_at", Timestamp),
    Column("created_at", Timestamp, nullable=False, server_default=func.now()),
    Column("deleted_at", Timestamp),
    CheckConstraint("sender_type IN ('user', 'agent', 'system')", name="check_sender_type"),
    CheckConstraint(
        "message_type IN ('text', 'stream', 'file', 'system')", name="check_message_type"
    ),
    UniqueConstraint("session_id", "seq", name="uq_chat_messages_session_seq"),
    UniqueConstraint(
        "session_id", "sender_id", "client_msg_id", name="uq_chat_messages_client_msg_id"
    ),
)
Index("idx_chat_messages_session_id", chat_messages.c.session_id)
Index("idx_chat_messages_sender_id", chat_messages.c.sender_id)
Index("idx_chat_messages_created_at", chat_messages.c.created_at)
# History paging stays flat however long a session grows: a time cursor becomes a seq in
# one probe, and a page's total is `last_seq` less the session's deleted messages, which
# this partial index finds without reading the live ones.
Index(
    "idx_chat_messages_session_created",
    chat_messages.c.session_id,
    chat_messages.c.created_at,
    chat_messages.c.seq,
)
Index(
    "idx_chat_messages_session_deleted",
    chat_messages.c.session_id,
    postgresql_where=chat_messages.c.deleted_at.is_not(None),
    sqlite_where=chat_messages.c.deleted_at.is_not(None),
)

chat_files = Table(
    "chat_files",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column(
        "message_id",
        String(100),
        ForeignKey("chat_messages.message_id", ondelete="CASCADE"),
    ),
    Column(
        "session_id",
        String(100),
        ForeignKey("chat_sessions.session_id", ondelete="CASCADE"),
    ),
    Column("file_id", String(100), nullable=False, unique=True),
    Column("file_name", String(255), nullable=False),
    Column("file_type", String(100)),
    Column("file_size", Integer),
    Column("file_url", String(500)),
    Column("thumbnail_url", String(500)),
    Column("storage_key", String(500)),
    Column("thumbnail_key", String(500)),
    Column("uploaded_by", String(100)),
    Column("uploaded_at", Timestamp, nullable=False, server_default=func.now()),
    Column("deleted_at", Timestamp),
    # Set once a deleted file's blobs are gone; NULL with deleted_at set: retry the removal.
    Column("blobs_removed_at", Timestamp),
)
Index("idx_chat_files_message_id", chat_files.c.message_id)
Index("idx_chat_files_uploaded_by", chat_files.c.uploaded_by)
Index("idx_chat_files_session_id", chat_files.c.session_id)
