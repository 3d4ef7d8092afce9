"""`/api/chat/sessions`: create, list, detail, delete, end, members, read watermark."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query

from chatservice.api import views
from chatservice.api.deps import Caller, Parts
from chatservice.api.responses import JSONBody, errors, json_too
from chatservice.api.routing import CheckedRoute
from chatservice.api.schemas import AddParticipants, CreateSession, MarkRead
from chatservice.domain import NewSession
from chatservice.values import MAX_INT, MAX_ROW_INT

router = APIRouter(prefix="/api/chat", tags=["sessions"], route_class=CheckedRoute)

SessionId = Annotated[str, Path(min_length=1, max_length=100)]


@router.post(
    "/sessions",
    status_code=201,
    responses={
        **json_too(200, "direct: the pair's existing session"),
        **errors(),
    },
)
async def create_session(body: CreateSession, caller: Caller, parts: Parts) -> JSONBody:
    kind = body.kind or ("agent" if body.agent_id is not None else "group")
    detail, created = await parts.sessions.create(
        caller,
        NewSession(
            kind=kind,
            title=body.title,
            agent_id=body.agent_id,
            metadata=body.metadata,
            participants=body.participants,
            scheduled_at=body.scheduled_at,
        ),
    )
    return JSONBody(views.session_created(detail), status_code=201 if created else 200)


@router.get("/sessions", responses=errors())
async def list_sessions(
    caller: Caller,
    parts: Parts,
    status: Annotated[Literal["scheduled", "active", "archived"] | None, Query()] = None,
    # agents.id is a 32-bit INTEGER: PostgreSQL refuses to compare it with anything wider.
    agent_id: Annotated[int | None, Query(ge=-MAX_ROW_INT - 1, le=MAX_ROW_INT)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_INT)] = 0,
) -> JSONBody:
    summaries, total = await parts.sessions.list(
        caller, status=status, agent_id=agent_id, limit=limit, offset=offset
    )
    return JSONBody(
        {
            "sessions": [views.session_summary(s) for s in summaries],
            "total": total,
            "has_more": offset + len(summaries) < total,
        }
    )


@router.get("/sessions/{session_id}", responses=errors(403, 404))
async def get_session(session_id: SessionId, caller: Caller, parts: Parts) -> JSONBody:
    detail = await parts.sessions.detail(caller, session_id)
    return JSONBody(views.session_detail(detail, caller.user_id))


@router.delete("/sessions/{session_id}", responses=errors(403, 404))
async def delete_session(session_id: SessionId, caller: Caller, parts: Parts) -> JSONBody:
    await parts.sessions.delete(caller, session_id)
    return JSONBody({"message": "Session archived successfully", "session_id": session_id})


@router.post("/sessions/{session_id}/end", responses=errors(403, 404))
async def end_session(session_id: SessionId, caller: Caller, parts: Parts) -> JSONBody:
    session = await parts.sessions.end(caller, session_id)
    return JSONBody(views.session_ended(session))


@router.post("/sessions/{session_id}/read", responses=errors(403, 404))
async def mark_read(
    session_id: SessionId, body: MarkRead, caller: Caller, parts: Parts
) -> JSONBody:
    watermark, unread = await parts.sessions.mark_read(caller, session_id, body.seq)
    return JSONBody({"session_id": session_id, "last_read_seq": watermark, "unread_count": unread})


@router.post("/sessions/{session_id}/participants", responses=errors(403, 404, 409))
async def add_participants(
    session_id: SessionId, body: AddParticipants, caller: Caller, parts: Parts
) -> JSONBody:
    added, detail = await parts.sessions.add_participants(caller, session_id, body.user_ids)
    return JSONBody(
        {
            "session_id": session_id,
            "added": added,
            "participants": [p.user_id for p in detail.participants],
        }
    )


@router.delete("/sessions/{session_id}/participants/{user_id}", responses=errors(403, 404, 409))
async def remove_participant(
    session_id: SessionId,
    user_id: Annotated[str, Path(min_length=1, max_length=100)],
    caller: Caller,
    parts: Parts,
) -> JSONBody:
    await parts.sessions.remove_participant(caller, session_id, user_id)
    return JSONBody({"session_id": session_id, "removed": user_id})
