"""`/api/chat/agents`: the agent registry."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import Field, StrictStr

from chatservice.api.deps import Caller, Parts
from chatservice.api.responses import JSONBody, errors
from chatservice.api.routing import CheckedRoute
from chatservice.api.schemas import NOT_BLANK, JSONObject, _Body
from chatservice.domain import JSON, Agent, isoformat
from chatservice.services.agents import public_settings

router = APIRouter(prefix="/api/chat", tags=["agents"], route_class=CheckedRoute)


class CreateAgent(_Body):
    name: StrictStr = Field(min_length=1, max_length=100, json_schema_extra=NOT_BLANK)
    avatar_url: StrictStr | None = Field(None, max_length=500)
    backend: Literal["demo", "openai"] = "demo"  # services/agents.py BACKENDS
    settings: JSONObject | None = None


def agent_json(agent: Agent) -> JSON:
    return {
        "id": agent.id,
        "name": agent.name,
        "avatar_url": agent.avatar_url,
        "backend": agent.backend,
        "settings": public_settings(agent),
        "created_at": isoformat(agent.created_at),
    }


@router.get("/agents", responses=errors())
async def list_agents(caller: Caller, parts: Parts) -> JSONBody:
    return JSONBody({"agents": [agent_json(a) for a in await parts.agents.list()]})


@router.post("/agents", status_code=201, responses=errors(403))
async def create_agent(body: CreateAgent, caller: Caller, parts: Parts) -> JSONBody:
    agent = await parts.agents.create(
        caller,
        name=body.name,
        avatar_url=body.avatar_url,
        backend=body.backend,
        settings=body.settings,
    )
    return JSONBody(agent_json(agent), status_code=201)
