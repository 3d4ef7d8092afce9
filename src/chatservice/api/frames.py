"""Client → server WebSocket frames of the native protocol, validated strictly.

`message` frames have no model: they are the hot path, and the message service checks
every field of a send whatever the transport (`MessageService.prepare`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr


class _Frame(BaseModel):
    model_config = ConfigDict(extra="ignore")


class FileFrame(_Frame):
    """Sends a message carrying a file uploaded earlier (`attach=false`)."""

    type: Literal["file"]
    file_id: StrictStr = Field(min_length=1, max_length=100)
    message: StrictStr | None = None
    client_msg_id: StrictStr | None = Field(None, min_length=1, max_length=100)


class TypingFrame(_Frame):
    type: Literal["typing"]
    is_typing: StrictBool


class ReadFrame(_Frame):
    type: Literal["read"]
    seq: StrictInt = Field(ge=0)


class CancelFrame(_Frame):
    type: Literal["cancel"]
    message_id: StrictStr = Field(min_length=1, max_length=100)


class PingFrame(_Frame):
    type: Literal["ping"]


FRAME_TYPES: dict[str, type[_Frame]] = {
    "file": FileFrame,
    "typing": TypingFrame,
    "read": ReadFrame,
    "ping": PingFrame,
    "cancel": CancelFrame,
}
