"""Every error leaves as `{"error": {"code", "message"}}` with the right status."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from chatservice.api.deps import Unauthorized
from chatservice.api.responses import JSONBody
from chatservice.services.errors import RateLimited, ServiceError

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "BAD_REQUEST",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "CONTENT_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    422: "VALIDATION_ERROR",
    429: "RATE_LIMIT",
}


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None, **extra: Any
) -> JSONBody:
    body: dict[str, Any] = {"code": code, "message": message, **extra}
    return JSONBody({"error": body}, status_code=status, headers=dict(headers or {}))


def install(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service(_: Request, exc: ServiceError) -> JSONBody:
        headers = None
        if isinstance(exc, RateLimited):
            # HTTP wants whole seconds; the body keeps the milliseconds (`retry_after`).
            headers = {"Retry-After": str(math.ceil(exc.retry_after_ms / 1000))}
        return error_response(exc.status, exc.code, exc.message, headers, **exc.extra)

    @app.exception_handler(Unauthorized)
    async def _unauthorized(_: Request, exc: Unauthorized) -> JSONBody:
        return error_response(
            401, "UNAUTHORIZED", exc.message, headers={"WWW-Authenticate": "Bearer"}
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONBody:
        details = [
            {
                "field": ".".join(str(p) for p in err.get("loc", ()) if p != "body"),
                "problem": err.get("msg", ""),
            }
            for err in exc.errors()
        ]
        first = details[0] if details else {"field": "", "problem": "invalid request"}
        message = f"{first['field']}: {first['problem']}" if first["field"] else first["problem"]
        return error_response(422, "VALIDATION_ERROR", message, details=details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONBody:
        code = _HTTP_CODES.get(exc.status_code, "ERROR")
        headers = exc.headers
        if exc.status_code == 405:
            # Starlette's `Allow` names the methods of the first route matching the path;
            # RFC 9110 wants all of the resource's (GET and POST /sessions are two routes).
            headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(request))}
        return error_response(exc.status_code, code, str(exc.detail), headers=headers)


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at the request's path."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.methods:
            match, _ = route.matches(request.scope)
            if match is not Match.NONE:
                methods |= route.methods
    return sorted(methods)
