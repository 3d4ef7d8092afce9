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
        # An agent's row never changes once created (there is no update or delete), so
        # each is read once per process: the read was on every answer's way to the
        # upstream's first token. As many entries as agents.
        self._known: dict[int, Agent] = {}

    async def list(self) -> list[Agent]:
        async with self.db.read() as conn:
            rows = (await conn.execute(select(agents).order_by(agents.c.id))).all()
        return [_agent(row) for row in rows]

    async def get(self, agent_id: int) -> Agent | None:
        known = self._known.get(agent_id)
        if known is not None:
            return known
        async with self.db.read() as conn:
            row = (await conn.execute(select(agents).where(agents.c.id == agent_id))).first()
        if row is None:
            return None
        agent = self._known[agent_id] = _agent(row)
        return agent

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
