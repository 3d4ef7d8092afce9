"""Messages as rows of `chat_messages` and back, and the conditions every query shares."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from chatservice.domain import Message
from chatservice.store.tables import chat_messages, chat_sessions

# Soft-deleted messages stay in the table but leave history.
VISIBLE = chat_messages.c.deleted_at.is_(None)


def message_from_row(row: Any) -> Message:
    return Message(
        message_id=row.message_id,
        session_id=row.session_id,
        seq=row.seq,
        sender_type=row.sender_type,
        sender_id=row.sender_id,
        message_type=row.message_type,
        content=row.content,
        metadata=row.meta,
        created_at=row.created_at,
        client_msg_id=row.client_msg_id,
        is_edited=row.is_edited,
        edited_at=row.edited_at,
        tokens_used=row.tokens_used,
        latency_ms=row.latency_ms,
    )


def message_row(message: Message) -> dict[str, Any]:
    return {
        "session_id": message.session_id,
        "message_id": message.message_id,
        "seq": message.seq,
        "sender_type": message.sender_type,
        "sender_id": message.sender_id,
        "message_type": message.message_type,
        "content": message.content,
        "meta": message.metadata,
        "client_msg_id": message.client_msg_id,
        "tokens_used": message.tokens_used,
        "latency_ms": message.latency_ms,
        "created_at": message.created_at,
    }


def visible_count(session_id: str) -> Any:
    """How many visible messages the session holds, without reading them: seqs are
    gap-free, one per stored message (taken in the transaction that inserts it), and
    messages are only ever soft-deleted; the deleted ones come from a partial index."""
    m, s = chat_messages, chat_sessions
    deleted = (
        select(func.count())
        .where(m.c.session_id == session_id, m.c.deleted_at.is_not(None))
        .scalar_subquery()
    )
    return select(s.c.last_seq - deleted).where(s.c.session_id == session_id)
