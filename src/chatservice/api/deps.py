"""Dependencies every route shares: the components and the authenticated caller."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from chatservice.auth import AuthError
from chatservice.components import Components
from chatservice.domain import Principal

_bearer = HTTPBearer(auto_error=False)


class Unauthorized(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def components(request: Request) -> Components:
    found: Components = request.app.state.components
    return found


async def principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    try:
        return components(request).tokens.verify(credentials.credentials if credentials else None)
    except AuthError as exc:
        raise Unauthorized(str(exc)) from exc


Caller = Annotated[Principal, Depends(principal)]
Parts = Annotated[Components, Depends(components)]
