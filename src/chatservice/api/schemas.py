"""Request bodies. Strict types: `"seq": "5"` is a 422, not a guess."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from chatservice.values import MAX_ROW_INT


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class CreateSession(_Body):
    agent_id: StrictInt | None = Field(None, ge=1, le=MAX_ROW_INT)
    title: StrictStr | None = Field(None, max_length=200)
    metadata: dict[str, Any] | None = None
    kind: Literal["agent", "direct", "group"] | None = None
    participants: list[StrictStr] = Field(default_factory=list, max_length=1000)
    scheduled_at: datetime | None = None


class SendMessage(_Body):
    content: StrictStr
    message_type: StrictStr = "text"
    metadata: dict[str, Any] | None = None
    client_msg_id: StrictStr | None = Field(None, min_length=1, max_length=100)


class MarkRead(_Body):
    seq: StrictInt = Field(ge=0)


class AddParticipants(_Body):
    user_ids: list[StrictStr] = Field(min_length=1, max_length=1000)


class EditMessage(_Body):
    content: StrictStr
