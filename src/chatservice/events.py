"""The events clients receive, in the native protocol's JSON, and the bus channels.

A service builds an event here and hands it to the `Publisher`, which wraps it in its
envelope (`envelope.py`) and encodes it once; every hub forwards the same bytes to its
native connections, and other protocols' codecs translate from the same event.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from chatservice.domain import JSON, Message, isoformat


def session_channel(session_id: str) -> str:
    return f"chat:session:{session_id}"


def typing_channel(session_id: str) -> str:
    return f"chat:typing:{session_id}"


def presence_channel(session_id: str) -> str:
    return f"chat:presence:{session_id}"


def user_channel(user_id: str) -> str:
    return f"chat:user:{user_id}"


def session_channels(session_id: str) -> tuple[str, str, str]:
    """Everything a connection to a session listens to."""
    return session_channel(session_id), typing_channel(session_id), presence_channel(session_id)


def message_payload(message: Message) -> JSON:
    """A message as REST returns it (the A2G-compatible REST contract's shape plus seq and
    client_msg_id)."""
    payload: JSON = {
        "message_id": message.message_id,
        "session_id": message.session_id,
        "seq": message.seq,
        "sender_type": message.sender_type,
        "sender_id": message.sender_id,
        "message_type": message.message_type,
        "content": message.content,
        "metadata": message.metadata,
        "client_msg_id": message.client_msg_id,
        "is_edited": message.is_edited,
        "created_at": isoformat(message.created_at),
    }
    if message.edited_at is not None:
        payload["edited_at"] = isoformat(message.edited_at)
    return payload


def message_event(message: Message) -> JSON:
    event = message_payload(message)
    event["type"] = "message"
    event["timestamp"] = event["created_at"]
    return event


def message_updated_event(message: Message) -> JSON:
    event = message_payload(message)
    event["type"] = "message_updated"
    event["timestamp"] = event.get("edited_at")
    return event


def message_deleted_event(message: Message, when: datetime) -> JSON:
    return {
        "type": "message_deleted",
        "session_id": message.session_id,
        "message_id": message.message_id,
        "seq": message.seq,
        "timestamp": isoformat(when),
    }


def typing_event(session_id: str, user_id: str, is_typing: bool) -> JSON:
    return {"type": "typing", "session_id": session_id, "user_id": user_id, "is_typing": is_typing}


def system_event(
    session_id: str, name: str, user_id: str | None, timestamp: str | None, **extra: Any
) -> JSON:
    return {
        "type": "system",
        "session_id": session_id,
        "event": name,
        "user_id": user_id,
        "timestamp": timestamp,
        **extra,
    }


def session_change_event(
    session_id: str, change: str, by: str | None, timestamp: str | None
) -> JSON:
    """For a user's own channel: a session of theirs was created, they were added to or
    removed from one, or it ended or was deleted."""
    return {
        "type": "session_changed",
        "session_id": session_id,
        "change": change,
        "by": by,
        "timestamp": timestamp,
    }


def unread_event(session_id: str, last_read_seq: int, unread_count: int) -> JSON:
    """For a user's own channel: their read position in a session moved (on any device)."""
    return {
        "type": "unread",
        "session_id": session_id,
        "last_read_seq": last_read_seq,
        "unread_count": unread_count,
    }


def receipt_event(session_id: str, user_id: str, seq: int, status: str = "read") -> JSON:
    return {
        "type": "receipt",
        "session_id": session_id,
        "user_id": user_id,
        "seq": seq,
        "status": status,
    }


def stream_start_event(
    session_id: str, message_id: str, sender_id: str, reply_to: str, timestamp: str | None
) -> JSON:
    return {
        "type": "stream_start",
        "session_id": session_id,
        "message_id": message_id,
        "sender_type": "agent",
        "sender_id": sender_id,
        "reply_to": reply_to,
        "timestamp": timestamp,
    }


def stream_chunk_event(session_id: str, message_id: str, content: str, index: int) -> JSON:
    return {
        "type": "stream_chunk",
        "session_id": session_id,
        "message_id": message_id,
        "content": content,
        "index": index,
    }


def stream_end_event(
    session_id: str,
    message_id: str,
    seq: int | None,
    tokens_used: int | None,
    latency_ms: int,
    status: str,
    chunks: int,
) -> JSON:
    return {
        "type": "stream_end",
        "session_id": session_id,
        "message_id": message_id,
        "seq": seq,
        "tokens_used": tokens_used,
        "latency_ms": latency_ms,
        "status": status,
        "chunks": chunks,
    }
