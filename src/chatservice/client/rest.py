"""Async client for the native REST API (`/api/chat`)."""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any

import httpx

from chatservice.client.realtime import RealtimeConnection

JSON = dict[str, Any]


class ChatAPIError(Exception):
    """An error answer: `status` (HTTP), `code` and `message` from the error body."""

    def __init__(self, status: int, code: str, message: str, body: Any = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.body = body


class ChatClient:
    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )

    async def __aenter__(self) -> ChatClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- sessions -------------------------------------------------------------------------

    async def create_session(
        self,
        *,
        title: str | None = None,
        kind: str | None = None,
        participants: list[str] | None = None,
        agent_id: int | None = None,
        metadata: JSON | None = None,
        scheduled_at: str | None = None,
    ) -> JSON:
        body: JSON = {"participants": participants or []}
        for key, value in (
            ("title", title),
            ("kind", kind),
            ("agent_id", agent_id),
            ("metadata", metadata),
            ("scheduled_at", scheduled_at),
        ):
            if value is not None:
                body[key] = value
        return await self._call("POST", "/api/chat/sessions", json=body)

    async def list_sessions(
        self,
        *,
        status: str | None = None,
        agent_id: int | None = None,
        limit: int = 20,
        offset: int = 0,
    ) -> JSON:
        params: JSON = {"limit": limit, "offset": offset}
        if status is not None:
            params["status"] = status
        if agent_id is not None:
            params["agent_id"] = agent_id
        return await self._call("GET", "/api/chat/sessions", params=params)

    async def get_session(self, session_id: str) -> JSON:
        return await self._call("GET", f"/api/chat/sessions/{session_id}")

    async def delete_session(self, session_id: str) -> JSON:
        return await self._call("DELETE", f"/api/chat/sessions/{session_id}")

    async def end_session(self, session_id: str) -> JSON:
        return await self._call("POST", f"/api/chat/sessions/{session_id}/end")

    async def add_participants(self, session_id: str, user_ids: list[str]) -> JSON:
        return await self._call(
            "POST", f"/api/chat/sessions/{session_id}/participants", json={"user_ids": user_ids}
        )

    async def remove_participant(self, session_id: str, user_id: str) -> JSON:
        return await self._call("DELETE", f"/api/chat/sessions/{session_id}/participants/{user_id}")

    async def mark_read(self, session_id: str, seq: int) -> JSON:
        return await self._call("POST", f"/api/chat/sessions/{session_id}/read", json={"seq": seq})

    # -- messages -------------------------------------------------------------------------

    async def list_messages(
        self,
        session_id: str,
        *,
        limit: int = 50,
        before: str | int | None = None,
        after: str | int | None = None,
    ) -> JSON:
        params: JSON = {"limit": limit}
        if before is not None:
            params["before"] = str(before)
        if after is not None:
            params["after"] = str(after)
        return await self._call("GET", f"/api/chat/sessions/{session_id}/messages", params=params)

    async def history(self, session_id: str, *, after_seq: int = 0, page: int = 200) -> list[JSON]:
        """Every message after `after_seq`, oldest first, following pages to the end."""
        messages: list[JSON] = []
        cursor = after_seq
        while True:
            body = await self.list_messages(session_id, limit=page, after=cursor)
            messages.extend(body["messages"])
            if not body["has_more"] or not body["messages"]:
                return messages
            cursor = body["messages"][-1]["seq"]

    async def send_message(
        self,
        session_id: str,
        content: str,
        *,
        client_msg_id: str | None = None,
        metadata: JSON | None = None,
    ) -> JSON:
        body: JSON = {"content": content}
        if client_msg_id is not None:
            body["client_msg_id"] = client_msg_id
        if metadata is not None:
            body["metadata"] = metadata
        return await self._call("POST", f"/api/chat/sessions/{session_id}/messages", json=body)

    # -- realtime -------------------------------------------------------------------------

    def realtime(
        self,
        session_id: str,
        *,
        since_seq: int | None = None,
        reconnect: bool = True,
        other_urls: Sequence[str] = (),
    ) -> RealtimeConnection:
        """A WebSocket connection to the session with this client's token.

        `other_urls`: further instances to fall back to when this one is unreachable.
        """
        if self.token is None:
            raise ValueError("a realtime connection needs a token")
        return RealtimeConnection(
            [self.base_url, *other_urls],
            session_id,
            self.token,
            since_seq=since_seq,
            reconnect=reconnect,
        )

    # -- service --------------------------------------------------------------------------

    async def healthz(self) -> JSON:
        return await self._call("GET", "/healthz")

    async def readyz(self) -> JSON:
        return await self._call("GET", "/readyz")

    async def _call(self, method: str, path: str, **kwargs: Any) -> JSON:
        response = await self._http.request(method, path, **kwargs)
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.is_error:
            error = body.get("error", {}) if isinstance(body, dict) else {}
            raise ChatAPIError(
                response.status_code,
                str(error.get("code", "HTTP_ERROR")),
                str(error.get("message", response.text[:200])),
                body,
            )
        if not isinstance(body, dict):
            raise ChatAPIError(response.status_code, "BAD_RESPONSE", "expected a JSON object")
        return body
