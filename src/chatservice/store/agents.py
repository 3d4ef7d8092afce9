"""Queries about the agent registry."""

from __future__ import annotations

from typing import Any

from sqlalchemy import insert, select

from chatservice.domain import Agent
from chatservice.store.database import Database
from chatservice.store.tables import agents


def _agent(row: Any) -> Agent:
    return Agent(
        id=row.id,
        name=row.name,
        avatar_url=row.avatar_url,
        backend=row.backend,
        settings=dict(row.settings or {}),
        created_at=row.created_at,
    )


class AgentStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def list(self) -> list[Agent]:
        async with self.db.read() as conn:
            rows = (await conn.execute(select(agents).order_by(agents.c.id))).all()
        return [_agent(row) for row in rows]

    async def get(self, agent_id: int) -> Agent | None:
        async with self.db.read() as conn:
            row = (await conn.execute(select(agents).where(agents.c.id == agent_id))).first()
        return _agent(row) if row else None

    async def create(
        self, name: str, avatar_url: str | None, backend: str, settings: dict[str, Any]
    ) -> Agent:
        async with self.db.write() as conn:
            row = (
                await conn.execute(
                    insert(agents)
                    .values(name=name, avatar_url=avatar_url, backend=backend, settings=settings)
                    .returning(*agents.c)
                )
            ).one()
        return _agent(row)
