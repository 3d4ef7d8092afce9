"""Events as they travel on the bus: the native WebSocket frames, encoded once.

A service builds an event, encodes it here once, and publishes the bytes; every hub
forwards those same bytes to its connections, so a frame is never re-encoded per
connection. Other protocols' codecs translate from these events.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson

from chatservice.domain import JSON, Message, isoformat

# Event types that carry a persisted message's `seq` and are delivered in seq order.
SEQUENCED_TYPES = frozenset({"message", "stream_end"})
# Frames of an agent answer in progress; `message_id` names the stream.
STREAM_TYPES = frozenset({"stream_start", "stream_chunk", "stream_end"})


def session_channel(session_id: str) -> str:
    return f"chat:session:{session_id}"


def typing_channel(session_id: str) -> str:
    return f"chat:typing:{session_id}"


def presence_channel(session_id: str) -> str:
    return f"chat:presence:{session_id}"


def session_channels(session_id: str) -> tuple[str, str, str]:
    """Everything a connection to a session listens to."""
    return session_channel(session_id), typing_channel(session_id), presence_channel(session_id)


def encode(event: JSON) -> bytes:
    return orjson.dumps(event)


def decode(data: bytes | str) -> JSON:
    value = orjson.loads(data)
    if not isinstance(value, dict):
        raise ValueError("an event is a JSON object")
    return value


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


def error_frame(code: str, message: str, **extra: Any) -> bytes:
    return orjson.dumps({"type": "error", "code": code, "message": message, **extra})
