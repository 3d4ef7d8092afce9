"""The JSON response class every route returns (orjson: fast, and handles datetimes), and
the responses every route documents in the OpenAPI document.

The document is a contract that schemathesis checks against a real server
(`tests/e2e/test_openapi_fuzz.py`): every status a route can answer is listed here with
the one error body, so a client generated from it knows them all.
"""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict
from starlette.responses import Response


class JSONBody(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class ErrorDetail(BaseModel):
    # Some errors carry more: `retry_after` (429), `details` (422), `client_msg_id`.
    model_config = ConfigDict(extra="allow")

    code: str
    message: str


class ErrorBody(BaseModel):
    """`{"error": {"code", "message"}}`: the body of every error, whatever its status."""

    model_config = ConfigDict(extra="forbid")

    error: ErrorDetail


Responses = dict[int | str, dict[str, Any]]

_WHY = {
    400: "BAD_REQUEST: a multipart body that cannot be parsed",
    401: "UNAUTHORIZED: missing, invalid or expired bearer token",
    403: "FORBIDDEN: not a participant, not the owner or sender, or not an admin",
    404: "NOT_FOUND (or a more precise `…_NOT_FOUND`): nothing by that id for the caller",
    409: "SESSION_CLOSED, FIXED_MEMBERSHIP, OWNER_CANNOT_LEAVE, NOT_EDITABLE, "
    "FILE_NOT_ATTACHABLE or CLIENT_MSG_ID_REUSED",
    413: "CONTENT_TOO_LARGE: the body, the content or the metadata is over its limit",
    415: "UNSUPPORTED_FILE_TYPE, FILE_TYPE_MISMATCH or EXPECTED_MULTIPART",
    416: "RANGE_NOT_SATISFIABLE (with `Content-Range: bytes */size`)",
    422: "VALIDATION_ERROR (`details` lists each problem) or a more precise code",
    429: "RATE_LIMIT: over the per-user message budget (`Retry-After` in seconds, "
    "`retry_after` in ms)",
    431: "HEADERS_TOO_LARGE: request line and headers over MAX_REQUEST_HEADER_BYTES",
    500: "INTERNAL: a dependency failed; the request can be retried",
}
# What any route can answer: a body over MAX_REQUEST_BODY (any method), a path or query
# value `values.py` refuses (NUL, lone surrogates), a head over the cap, a failed dependency.
_EVERY_ROUTE = (413, 422, 431, 500)


def errors(*statuses: int, authenticated: bool = True) -> Responses:
    """`responses=` for a route: each error status it can answer, with the error body.

    `statuses` are the route's own (403, 404, …); those every route (and, unless
    `authenticated=False`, every authenticated route: 401) can answer are added here.
    """
    every = set(_EVERY_ROUTE) | set(statuses) | ({401} if authenticated else set())
    return {status: {"model": ErrorBody, "description": _WHY[status]} for status in sorted(every)}


def json_too(status: int, description: str) -> Responses:
    """A second success status of a JSON route (e.g. 200 beside 201 for a retried send)."""
    return {status: {"description": description, "content": {"application/json": {"schema": {}}}}}
