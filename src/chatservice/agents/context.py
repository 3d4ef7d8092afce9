"""What an agent is shown: its system prompt, then the conversation within a budget."""

from __future__ import annotations

from collections.abc import Sequence

from chatservice.agents.base import Turn
from chatservice.domain import Agent, Message, SenderType

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant in a chat conversation."


def build_context(agent: Agent, history: Sequence[Message], budget_chars: int) -> list[Turn]:
    """`history` oldest first, ending with the question; the newest messages are kept
    while they fit in `budget_chars` (the question always, cut to the budget)."""
    turns: list[Turn] = []
    budget = budget_chars
    for message in reversed(history):
        if message.sender_type == SenderType.SYSTEM or not message.content:
            continue
        if len(message.content) > budget:
            if not turns:
                turns.append(Turn("user", message.content[-budget:]))
            break
        budget -= len(message.content)
        role = "assistant" if message.sender_type == SenderType.AGENT else "user"
        turns.append(Turn(role, message.content))
    turns.reverse()
    prompt = str(agent.settings.get("system_prompt") or DEFAULT_SYSTEM_PROMPT)
    return [Turn("system", prompt), *turns]
