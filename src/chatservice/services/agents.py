"""The agent registry: anyone may list agents; only admins add them."""

from __future__ import annotations

from typing import Any

from chatservice.agents.policy import UpstreamPolicy, UpstreamRefused
from chatservice.domain import Agent, Principal
from chatservice.services.errors import Forbidden, InvalidInput
from chatservice.services.sessions import check_metadata
from chatservice.store.agents import AgentStore

BACKENDS = ("demo", "openai")
SECRET_SETTINGS = frozenset({"api_key"})


class AgentService:
    def __init__(self, store: AgentStore, policy: UpstreamPolicy) -> None:
        self.store = store
        self.policy = policy

    async def list(self) -> list[Agent]:
        return await self.store.list()

    async def create(
        self,
        principal: Principal,
        *,
        name: str,
        avatar_url: str | None,
        backend: str,
        settings: dict[str, Any] | None,
    ) -> Agent:
        if "admin" not in principal.roles:
            raise Forbidden('only an admin (a `roles` claim with "admin") can add agents')
        if not name.strip():
            raise InvalidInput("name is empty")
        if backend not in BACKENDS:
            raise InvalidInput(f"backend must be one of {', '.join(BACKENDS)}")
        check_metadata(settings)
        if backend == "openai":
            try:
                self.policy.check(settings or {})
            except UpstreamRefused as exc:
                raise InvalidInput(str(exc)) from None
        return await self.store.create(name.strip(), avatar_url, backend, settings or {})


def public_settings(agent: Agent) -> dict[str, Any]:
    """An agent's settings without its secrets, for listing."""
    return {k: v for k, v in agent.settings.items() if k not in SECRET_SETTINGS}
