"""`/api/chat/sessions/{id}/messages`: history pages and sending over HTTP."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from chatservice.api.deps import Caller, Parts
from chatservice.api.responses import JSONBody, errors, json_too
from chatservice.api.routing import CheckedRoute
from chatservice.api.schemas import OUT_OF_RANGE, EditMessage, SendMessage, moment
from chatservice.api.sessions import SessionId
from chatservice.domain import isoformat
from chatservice.events import message_payload
from chatservice.services.errors import InvalidInput
from chatservice.services.messages import Draft

router = APIRouter(prefix="/api/chat", tags=["messages"], route_class=CheckedRoute)

MessageId = Annotated[str, Path(min_length=1, max_length=100)]
# A history cursor is a seq (at most 18 digits, like `since_seq`) or an RFC 3339 time;
# the document says so, and `_check_cursor` holds the route to it.
HistoryCursor = Annotated[
    str | None,
    Query(
        max_length=64,
        description="a seq, or an RFC 3339 time (a space may stand for an unescaped `+`)",
        json_schema_extra={
            "anyOf": [
                {"type": "string", "pattern": "^[0-9]{0,18}$"},
                {"type": "string", "format": "date-time"},
            ]
        },
    ),
]


def _check_cursor(raw: str | None, name: str) -> None:
    if raw is None or (raw.isascii() and raw.isdigit() and len(raw) <= 18) or raw == "":
        return
    try:
        moment(raw, name)
    except ValueError as exc:
        out_of_range = OUT_OF_RANGE in str(exc)
        raise InvalidInput(
            str(exc) if out_of_range else f"{name} must be a seq or an RFC 3339 time"
        ) from None


@router.get("/sessions/{session_id}/messages", responses=errors(403, 404))
async def list_messages(
    session_id: SessionId,
    caller: Caller,
    parts: Parts,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    before: HistoryCursor = None,
    after: HistoryCursor = None,
) -> JSONBody:
    _check_cursor(before, "before")
    _check_cursor(after, "after")
    page = await parts.messages.page(caller, session_id, before=before, after=after, limit=limit)
    return JSONBody(
        {
            "messages": [message_payload(m) for m in page.messages],
            "has_more": page.has_more,
            "total": page.total,
        }
    )


@router.post(
    "/sessions/{session_id}/messages",
    status_code=201,
    responses={
        **json_too(200, "a retry (same client_msg_id): the original message"),
        **errors(403, 404, 409, 429),
    },
)
async def send_message(
    session_id: SessionId, body: SendMessage, caller: Caller, parts: Parts
) -> JSONBody:
    result = await parts.messages.send(
        caller,
        session_id,
        Draft(
            content=body.content,
            message_type=body.message_type,
            metadata=body.metadata,
            client_msg_id=body.client_msg_id,
        ),
    )
    message = result.message
    return JSONBody(
        {
            "message_id": message.message_id,
            "seq": message.seq,
            "status": "sent",
            "client_msg_id": message.client_msg_id,
            "created_at": isoformat(message.created_at),
        },
        status_code=201 if result.created else 200,
    )


@router.patch("/messages/{message_id}", responses=errors(403, 404, 409))
async def edit_message(
    message_id: MessageId, body: EditMessage, caller: Caller, parts: Parts
) -> JSONBody:
    edited = await parts.messages.edit(caller, message_id, body.content)
    return JSONBody(message_payload(edited))


@router.delete("/messages/{message_id}", responses=errors(403, 404, 409))
async def delete_message(message_id: MessageId, caller: Caller, parts: Parts) -> JSONBody:
    deleted = await parts.messages.delete(caller, message_id)
    return JSONBody(
        {
            "message": "Message deleted successfully",
            "message_id": deleted.message_id,
            "session_id": deleted.session_id,
        }
    )
