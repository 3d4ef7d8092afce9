"""History indexes: a session's messages by time, and a session's deleted messages.

With them a history page costs the same at a million messages as at ten thousand: a time
cursor is turned into a seq bound by one index probe, and the page's total is the
session's `last_seq` less its deleted messages (found through the partial index) instead
of a count of every message.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_DELETED = sa.text("deleted_at IS NOT NULL")


def upgrade() -> None:
    # Built concurrently on PostgreSQL (outside the migration's transaction), so a large
    # deployment keeps taking messages while the indexes are built.
    with op.get_context().autocommit_block():
        op.create_index(
            "idx_chat_messages_session_created",
            "chat_messages",
            ["session_id", "created_at", "seq"],
            postgresql_concurrently=True,
        )
        op.create_index(
            "idx_chat_messages_session_deleted",
            "chat_messages",
            ["session_id"],
            postgresql_where=_DELETED,
            sqlite_where=_DELETED,
            postgresql_concurrently=True,
        )


def downgrade() -> None:
    op.drop_index("idx_chat_messages_session_deleted", "chat_messages")
    op.drop_index("idx_chat_messages_session_created", "chat_messages")
