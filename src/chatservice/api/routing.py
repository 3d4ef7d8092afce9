"""The route class every REST router uses: request values pass `values.py` first.

FastAPI parses JSON bodies with the standard library, which accepts NaN, Infinity and
lone surrogates; here bodies are parsed with orjson (which refuses those) and every string
and number in them, in the path and in the query is checked before any handler runs.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from fastapi import HTTPException, Request, Response
from fastapi.routing import APIRoute

from chatservice.values import UnacceptableValue, check_json, check_text


class CheckedRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            # orjson.JSONDecodeError is a json.JSONDecodeError: FastAPI answers it as 422.
            parsed = orjson.loads(await self.body())
            try:
                check_json(parsed, "body")
            except UnacceptableValue as exc:
                raise HTTPException(422, str(exc)) from None
            self._json = parsed
        return self._json


class CheckedRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            try:
                for name, value in request.path_params.items():
                    if isinstance(value, str):
                        check_text(value, name)
                for name, value in request.query_params.multi_items():
                    check_text(name, "query")
                    check_text(value, name)
            except UnacceptableValue as exc:
                raise HTTPException(422, str(exc)) from None
            return await handler(CheckedRequest(request.scope, request.receive))

        return checked
