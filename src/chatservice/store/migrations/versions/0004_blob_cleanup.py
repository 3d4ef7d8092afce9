"""Blob cleanup bookkeeping: when a deleted file's blobs were removed from the blob store.

A file row is soft-deleted in the transaction that deletes its message; its blobs go
afterwards. If the blob store is down then, the row keeps `blobs_removed_at` NULL and the
housekeeping job removes the blobs later.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("chat_files") as batch:
        batch.add_column(sa.Column("blobs_removed_at", sa.DateTime(timezone=True)))
    # Files deleted before this revision had their blobs removed (or logged as orphans).
    op.execute("UPDATE chat_files SET blobs_removed_at = deleted_at WHERE deleted_at IS NOT NULL")


def downgrade() -> None:
    with op.batch_alter_table("chat_files") as batch:
        batch.drop_column("blobs_removed_at")
