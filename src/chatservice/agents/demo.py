"""The built-in demo agent: deterministic, needs nothing, streams like a real model."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from chatservice.agents.base import AgentEvent, AgentRequest, Delta, Usage


def demo_answer(request: AgentRequest) -> str:
    question = next((t.content for t in reversed(request.turns) if t.role == "user"), "")
    earlier = sum(1 for t in request.turns if t.role == "user") - 1
    return (
        f'{request.agent.name} here. You said: "{question.strip()}". '
        f"I am the built-in demo agent, so I answer every message the same way, "
        f"streamed in small pieces like a real model would. "
        f"This conversation had {earlier} earlier message{'s' if earlier != 1 else ''} "
        f"from you before this one."
    )


class DemoAgent:
    def __init__(self, chunk_size: int, delay_ms: int) -> None:
        self.chunk_size = chunk_size
        self.delay = delay_ms / 1000

    async def stream(self, request: AgentRequest) -> AsyncIterator[AgentEvent]:
        text = demo_answer(request)
        for start in range(0, len(text), self.chunk_size):
            if start and self.delay:
                await asyncio.sleep(self.delay)
            yield Delta(text[start : start + self.chunk_size])
        prompt = sum(len(t.content.split()) for t in request.turns)
        yield Usage(total_tokens=prompt + len(text.split()))
