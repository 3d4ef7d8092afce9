"""The agent backend protocol: a conversation in, text deltas (and usage) out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from chatservice.domain import Agent


class AgentFailure(Exception):
    """The upstream failed (error status, timeout, stall, malformed stream)."""


@dataclass(slots=True)
class Turn:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(slots=True)
class AgentRequest:
    agent: Agent
    settings: dict[str, Any]
    turns: list[Turn] = field(default_factory=list)  # system prompt first, oldest next


@dataclass(slots=True)
class Delta:
    text: str


@dataclass(slots=True)
class Usage:
    total_tokens: int


AgentEvent = Delta | Usage


class AgentBackend(Protocol):
    def stream(self, request: AgentRequest) -> AsyncIterator[AgentEvent]:
        """Yield the answer as it is produced. Cancelling the consuming task must stop
        the generation and release the upstream request."""
        ...
