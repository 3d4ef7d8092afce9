"""The WebSocket endpoints' routing, in front of the whole HTTP application.

A WebSocket's ASGI call lasts as long as the socket. Routed through FastAPI, each one
keeps FastAPI's and Starlette's entry points, a dozen middleware and routing coroutines
alive for that whole time, with three `AsyncExitStack`s for dependencies the endpoints do
not use: about a third of an idle connection's memory, which is what caps how many
connections one process holds. None of those layers does anything for a WebSocket (the
HTTP middleware pass them through; origin, token and size checks are the endpoints' own),
so `serve` runs this router as the application: these routes are matched first and
called directly, everything else goes to FastAPI.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from chatservice.api.ws import chat_socket
from chatservice.api.ws_mux import multiplexed_socket


class SocketRoutes:
    """An ASGI app: `/ws` and `/ws/{session_id}` go straight to their endpoints, the rest
    to `app` (the FastAPI application, whose state the endpoints read)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            route = _route(scope["path"])
            if route is not None:
                endpoint, arguments = route
                scope["app"] = self.app  # what FastAPI would have set: `websocket.app`
                await endpoint(WebSocket(scope, receive, send), *arguments)
                return
        await self.app(scope, receive, send)


def _route(path: str) -> tuple[Callable[..., Awaitable[None]], tuple[str, ...]] | None:
    """The endpoint and its arguments after the socket. Called directly, not through a
    closure: a wrapper coroutine would stay alive as long as the socket."""
    if path == "/ws":
        return multiplexed_socket, ()
    prefix, slash, session_id = path.rpartition("/")
    if prefix == "/ws" and slash and session_id:
        return chat_socket, (session_id,)
    return None
