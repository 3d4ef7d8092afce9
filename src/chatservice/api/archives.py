"""Transcripts and archives: `/api/chat/sessions/{id}/transcript` and `…/archive`."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from starlette.responses import Response, StreamingResponse

from chatservice.api.deps import Caller, Parts
from chatservice.api.responses import Responses, errors
from chatservice.api.routing import CheckedRoute
from chatservice.api.sessions import SessionId
from chatservice.media.names import content_disposition
from chatservice.services.archives import Document

router = APIRouter(prefix="/api/chat", tags=["archives"], route_class=CheckedRoute)

Format = Annotated[Literal["text", "json"], Query()]
# `format` picks the body's type; `response_class=Response` keeps FastAPI from claiming JSON.
_DOCUMENT: Responses = {
    200: {
        "description": "`format=text`: the transcript layout; `format=json`: every message",
        "content": {
            "text/plain": {"schema": {"type": "string"}},
            "application/json": {"schema": {"type": "object"}},
        },
    }
}


@router.get(
    "/sessions/{session_id}/transcript",
    response_class=Response,
    responses={**_DOCUMENT, **errors(403, 404)},
)
async def transcript(
    session_id: SessionId, caller: Caller, parts: Parts, format: Format = "text"
) -> Response:
    return _document(await parts.archives.transcript(caller, session_id, format), "inline")


@router.get(
    "/sessions/{session_id}/archive",
    response_class=Response,
    responses={**_DOCUMENT, **errors(403, 404)},
)
async def archive(
    session_id: SessionId, caller: Caller, parts: Parts, format: Format = "text"
) -> Response:
    return _document(await parts.archives.archived(caller, session_id, format), "attachment")


def _document(document: Document, disposition: str) -> Response:
    return StreamingResponse(
        document.chunks,
        media_type=document.content_type,
        headers={
            "Content-Disposition": content_disposition(disposition, document.file_name),
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "private, no-cache",
        },
    )
