"""Files and archives: thumbnail key and soft delete on files; archive bookkeeping on sessions.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("chat_files") as batch:
        batch.add_column(sa.Column("thumbnail_key", sa.String(500)))
        batch.add_column(sa.Column("deleted_at", sa.DateTime(timezone=True)))
    with op.batch_alter_table("chat_sessions") as batch:
        # pending → written (done) or nothing to write (empty); NULL: never ended.
        batch.add_column(sa.Column("archive_state", sa.String(10)))
        batch.add_column(sa.Column("archive_key", sa.String(500)))
        batch.add_column(sa.Column("archive_json_key", sa.String(500)))
        batch.add_column(sa.Column("archived_at", sa.DateTime(timezone=True)))
        # Seq the newest periodic snapshot covers; the job skips sessions without news.
        batch.add_column(sa.Column("snapshot_seq", sa.Integer, nullable=False, server_default="0"))
        batch.create_check_constraint(
            "check_archive_state", "archive_state IN ('pending', 'done', 'empty')"
        )
    op.create_index("idx_chat_sessions_updated_at", "chat_sessions", ["updated_at"])


def downgrade() -> None:
    op.drop_index("idx_chat_sessions_updated_at", "chat_sessions")
    with op.batch_alter_table("chat_sessions") as batch:
        batch.drop_constraint("check_archive_state", type_="check")
        for name in ("snapshot_seq", "archived_at", "archive_json_key", "archive_key"):
            batch.drop_column(name)
        batch.drop_column("archive_state")
    with op.batch_alter_table("chat_files") as batch:
        batch.drop_column("deleted_at")
        batch.drop_column("thumbnail_key")
