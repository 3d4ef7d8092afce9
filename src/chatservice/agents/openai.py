"""Any OpenAI-compatible chat completions server, streamed through the official SDK.

Per-agent settings (the `agents.settings` column): `model`, `base_url`, `api_key`
(or `api_key_env`, the name of an environment variable), `system_prompt`,
`temperature`, `max_tokens`. Missing ones fall back to OPENAI_* settings; the default key
only ever goes to the default upstream. Every call first passes the operator's
`UpstreamPolicy` (which upstreams, which key variables).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any, cast

import openai
from openai import AsyncOpenAI, omit
from openai.types.chat import ChatCompletionMessageParam

from chatservice.agents.base import AgentEvent, AgentFailure, AgentRequest, Delta, Usage
from chatservice.agents.policy import UpstreamPolicy, UpstreamRefused


class OpenAIAgent:
    def __init__(
        self,
        *,
        default_base_url: str,
        default_api_key: str,
        default_model: str,
        stall_timeout: float,
        total_timeout: float,
        policy: UpstreamPolicy | None = None,
    ) -> None:
        self.policy = policy or UpstreamPolicy(default_base_url=default_base_url)
        self.default_base_url = default_base_url
        self.default_api_key = default_api_key
        self.default_model = default_model
        self.stall_timeout = stall_timeout
        self.total_timeout = total_timeout
        self._clients: dict[tuple[str, str], AsyncOpenAI] = {}

    def _client(self, settings: dict[str, Any]) -> AsyncOpenAI:
        base_url = str(settings.get("base_url") or self.default_base_url)
        key_env = settings.get("api_key_env")
        default_key = self.default_api_key if self.policy.may_send_default_key(base_url) else ""
        api_key = str(
            settings.get("api_key")
            or (os.environ.get(str(key_env), "") if key_env else "")
            or default_key
            or "not-needed"  # local servers often take any key; the SDK insists on one
        )
        cache_key = (base_url, api_key)
        client = self._clients.get(cache_key)
        if client is None:
            # Retries would repeat a half-streamed answer; a failure ends the stream.
            client = AsyncOpenAI(
                base_url=base_url, api_key=api_key, max_retries=0, timeout=self.total_timeout
            )
            self._clients[cache_key] = client
        return client

    async def stream(self, request: AgentRequest) -> AsyncIterator[AgentEvent]:
        settings = request.settings
        temperature = settings.get("temperature")
        max_tokens = settings.get("max_tokens")
        messages = cast(
            "list[ChatCompletionMessageParam]",
            [{"role": t.role, "content": t.content} for t in request.turns],
        )
        try:
            await self.policy.check_reachable(settings)
        except UpstreamRefused as exc:
            raise AgentFailure(f"agent settings refused: {exc}") from None
        try:
            upstream = await asyncio.wait_for(
                self._client(settings).chat.completions.create(
                    model=str(settings.get("model") or self.default_model),
                    messages=messages,
                    stream=True,
                    stream_options={"include_usage": True},
                    temperature=float(temperature) if temperature is not None else omit,
                    max_tokens=int(max_tokens) if max_tokens is not None else omit,
                ),
                self.stall_timeout,
            )
        except TimeoutError as exc:
            raise AgentFailure(f"upstream did not answer within {self.stall_timeout}s") from exc
        except openai.OpenAIError as exc:
            raise AgentFailure(f"upstream error: {exc}") from exc
        chunks = upstream.__aiter__()
        try:
            while True:
                try:
                    # A deadline on this task, not `wait_for`'s task per chunk.
                    async with asyncio.timeout(self.stall_timeout):
                        chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    return
                except TimeoutError as exc:
                    raise AgentFailure(
                        f"upstream stalled for more than {self.stall_timeout}s"
                    ) from exc
                except (openai.OpenAIError, ValueError, KeyError) as exc:
                    raise AgentFailure(f"upstream stream broke: {exc}") from exc
                for choice in chunk.choices or ():
                    text = choice.delta.content if choice.delta else None
                    if text:
                        yield Delta(text)
                if chunk.usage is not None:
                    yield Usage(total_tokens=int(chunk.usage.total_tokens or 0))
        finally:
            # Closes the HTTP response, so a cancelled answer stops the upstream at once.
            with contextlib.suppress(Exception):
                await upstream.close()

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
