"""Errors a service raises; each transport maps `code` and `status` to its own form."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    code = "BAD_REQUEST"
    status = 400

    def __init__(self, message: str, *, code: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.extra = extra


class InvalidInput(ServiceError):
    code = "VALIDATION_ERROR"
    status = 422


class NotFound(ServiceError):
    code = "NOT_FOUND"
    status = 404


class Forbidden(ServiceError):
    code = "FORBIDDEN"
    status = 403


class Conflict(ServiceError):
    code = "CONFLICT"
    status = 409


class SessionClosed(Conflict):
    code = "SESSION_CLOSED"


class TooLarge(ServiceError):
    code = "CONTENT_TOO_LARGE"
    status = 413


class RateLimited(ServiceError):
    """Over the per-user send budget; `retry_after` (ms) says when the next send fits."""

    code = "RATE_LIMIT"
    status = 429

    def __init__(self, retry_after_ms: int) -> None:
        super().__init__("too many messages; slow down", retry_after=retry_after_ms)
        self.retry_after_ms = retry_after_ms


class UnsupportedMediaType(ServiceError):
    code = "UNSUPPORTED_FILE_TYPE"
    status = 415
