"""Initial schema: sessions, participants, messages, files, agents.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

JSONType = sa.JSON().with_variant(JSONB(), "postgresql")
Timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "agents",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("avatar_url", sa.String(500)),
        sa.Column("backend", sa.String(20), nullable=False, server_default="demo"),
        sa.Column("settings", JSONType),
        sa.Column("created_at", Timestamp, nullable=False, server_default=sa.func.now()),
    )
    op.create_table(
        "chat_sessions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("session_id", sa.String(100), nullable=False, unique=True),
        sa.Column("trace_id", sa.String(100), unique=True),
        sa.Column("user_id", sa.String(100), nullable=False),
        sa.Column("agent_id", sa.Integer),
        sa.Column("kind", sa.String(10), nullable=False, server_default="group"),
        sa.Column("title", sa.String(200)),
        sa.Column("status", sa.String(20), nullable=False, server_default="active"),
        sa.Column("metadata", JSONType),
        sa.Column("direct_key", sa.String(201), unique=True),
        sa.Column("last_seq", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created_at", Timestamp, nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", Timestamp, nullable=False, server_default=sa.func.now()),
        sa.Column("scheduled_at", Timestamp),
        sa.Column("started_at", Timestamp),
        sa.Column("ended_at", Timestamp),
        sa.CheckConstraint(
            "status IN ('scheduled', 'active', 'archived', 'deleted')", name="check_status"
        ),
        sa.CheckConstraint("kind IN ('agent', 'direct', 'group')", name="check_kind"),
    )
    op.create_index("idx_chat_sessions_user_id", "chat_sessions", ["user_id"])
    op.create_index("idx_chat_sessions_agent_id", "chat_sessions", ["agent_id"])
    op.create_index("idx_chat_sessions_trace_id", "chat_sessions", ["trace_id"])
    op.create_index("idx_chat_sessions_status", "chat_sessions", ["status"])

    op.create_table(
        "chat_participants",
        sa.Column(
            "session_id",
            sa.String(100),
            sa.ForeignKey("chat_sessions.session_id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("user_id", sa.String(100), primary_key=True),
        sa.Column("role", sa.String(20), nullable=False, server_default="member"),
        sa.Column("display_name", sa.String(200)),
        sa.Column("joined_at", Timestamp, nullable=False, server_default=sa.func.now()),
        sa.Column("last_read_seq", sa.Integer, nullable=False, server_default="0"),
        sa.CheckConstraint("role IN ('owner', 'member')", name="check_role"),
    )
    op.create_index("idx_chat_participants_user_id", "chat_participants", ["user_id"])

    op.create_table(
        "chat_messages",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "session_id",
            sa.String(100),
            sa.ForeignKey("chat_sessions.session_id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("message_id", sa.String(100), nullable=False, unique=True),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("sender_type", sa.String(20), nullable=False),
        sa.Column("sender_id", sa.String(100), nullable=False),
        sa.Column("message_type", sa.String(20), nullable=False),
        sa.Column("content", sa.Text),
        sa.Column("metadata", JSONType),
        sa.Column("client_msg_id", sa.String(100)),
        sa.Column("tokens_used", sa.Integer),
        sa.Column("latency_ms", sa.Integer),
        sa.Column("is_edited", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("edited_at", Timestamp),
        sa.Column("created_at", Timestamp, nullable=False, server_default=sa.func.now()),
        sa.Column("deleted_at", Timestamp),
        sa.CheckConstraint("sender_type IN ('user', 'agent', 'system')", name="check_sender_type"),
        sa.CheckConstraint(
            "message_type IN ('text', 'stream', 'file', 'system')", name="check_message_type"
        ),
        sa.UniqueConstraint("session_id", "seq", name="uq_chat_messages_session_seq"),
        sa.UniqueConstraint(
            "session_id", "sender_id", "client_msg_id", name="uq_chat_messages_client_msg_id"
        ),
    )
    op.create_index("idx_chat_messages_session_id", "chat_messages", ["session_id"])
    op.create_index("idx_chat_messages_sender_id", "chat_messages", ["sender_id"])
    op.create_index("idx_chat_messages_created_at", "chat_messages", ["created_at"])

    op.create_table(
        "chat_files",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "message_id",
            sa.String(100),
            sa.ForeignKey("chat_messages.message_id", ondelete="CASCADE"),
        ),
        sa.Column(
            "session_id",
            sa.String(100),
            sa.ForeignKey("chat_sessions.session_id", ondelete="CASCADE"),
        ),
        sa.Column("file_id", sa.String(100), nullable=False, unique=True),
        sa.Column("file_name", sa.String(255), nullable=False),
        sa.Column("file_type", sa.String(100)),
        sa.Column("file_size", sa.Integer),
        sa.Column("file_url", sa.String(500)),
        sa.Column("thumbnail_url", sa.String(500)),
        sa.Column("storage_key", sa.String(500)),
        sa.Column("uploaded_by", sa.String(100)),
        sa.Column("uploaded_at", Timestamp, nullable=False, server_default=sa.func.now()),
    )
    op.create_index("idx_chat_files_message_id", "chat_files", ["message_id"])
    op.create_index("idx_chat_files_uploaded_by", "chat_files", ["uploaded_by"])
    op.create_index("idx_chat_files_session_id", "chat_files", ["session_id"])

    # The built-in demo agent, so the `agent_id: 1` of the A2G-compatible REST contract's
    # examples names a real agent on a fresh install.
    agents = sa.table(
        "agents",
        sa.column("id", sa.Integer),
        sa.column("name", sa.String),
        sa.column("avatar_url", sa.String),
        sa.column("backend", sa.String),
    )
    op.bulk_insert(agents, [{"id": 1, "name": "Demo", "avatar_url": None, "backend": "demo"}])
    if op.get_bind().dialect.name == "postgresql":
        op.execute("SELECT setval(pg_get_serial_sequence('agents', 'id'), 1)")


def downgrade() -> None:
    op.drop_table("chat_files")
    op.drop_table("chat_messages")
    op.drop_table("chat_participants")
    op.drop_table("chat_sessions")
    op.drop_table("agents")
