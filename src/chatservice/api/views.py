"""Domain objects rendered as the JSON bodies of the A2G-compatible REST contract, plus the
fields this service adds."""

from __future__ import annotations

from chatservice.domain import JSON, Agent, Session, SessionDetail, SessionSummary, isoformat
from chatservice.events import message_payload

__all__ = ["message_payload", "session_created", "session_detail", "session_summary"]


def _agent(agent: Agent | None) -> JSON | None:
    if agent is None:
        return None
    return {"id": agent.id, "name": agent.name, "avatar_url": agent.avatar_url}


def _session_base(session: Session) -> JSON:
    return {
        "session_id": session.session_id,
        "trace_id": session.trace_id,
        "user_id": session.user_id,
        "agent_id": session.agent_id,
        "kind": session.kind,
        "title": session.title,
        "status": session.status,
        "metadata": session.metadata,
        "last_seq": session.last_seq,
        "created_at": isoformat(session.created_at),
        "scheduled_at": isoformat(session.scheduled_at),
        "started_at": isoformat(session.started_at),
        "ended_at": isoformat(session.ended_at),
    }


def session_created(detail: SessionDetail) -> JSON:
    body = _session_base(detail.session)
    body["participants"] = [p.user_id for p in detail.participants]
    return body


def session_detail(detail: SessionDetail, viewer: str) -> JSON:
    body = _session_base(detail.session)
    body.update(
        agent=_agent(detail.agent),
        participants=[p.user_id for p in detail.participants],
        members=[
            {
                "user_id": p.user_id,
                "role": p.role,
                "display_name": p.display_name,
                "joined_at": isoformat(p.joined_at),
                "last_read_seq": p.last_read_seq,
            }
            for p in detail.participants
        ],
        online=detail.online,
        message_count=detail.message_count,
        last_activity=isoformat(detail.last_activity),
    )
    mine = next((p for p in detail.participants if p.user_id == viewer), None)
    body["last_read_seq"] = mine.last_read_seq if mine else 0
    return body


def session_summary(summary: SessionSummary) -> JSON:
    session = summary.session
    return {
        "session_id": session.session_id,
        "title": session.title,
        "kind": session.kind,
        "agent_id": session.agent_id,
        "agent_name": summary.agent_name,
        "last_message": summary.last_message,
        "last_message_at": isoformat(summary.last_message_at),
        "last_seq": session.last_seq,
        "unread_count": summary.unread_count,
        "status": session.status,
        "created_at": isoformat(session.created_at),
    }


def session_ended(session: Session) -> JSON:
    start = session.started_at or session.created_at
    duration = (
        int((session.ended_at - start).total_seconds()) if session.ended_at is not None else None
    )
    return {
        "session_id": session.session_id,
        "status": session.status,
        "ended_at": isoformat(session.ended_at),
        "duration_seconds": duration,
        "archive": {
            "state": session.archive_state,
            "text_key": session.archive_key,
            "json_key": session.archive_json_key,
            "url": f"/api/chat/sessions/{session.session_id}/archive"
            if session.archive_state == "done"
            else None,
        },
    }
