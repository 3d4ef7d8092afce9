"""Bearer tokens: HMAC-signed JWTs whose `sub` is the user id."""

from __future__ import annotations

import time
from typing import Any

import jwt

from chatservice.domain import Principal

MAX_USER_ID_LENGTH = 100


class AuthError(Exception):
    """The token is missing, malformed, expired or not ours; the message says which."""


class TokenCodec:
    def __init__(self, secret: str, algorithm: str = "HS256") -> None:
        self._secret = secret
        self._algorithm = algorithm

    def issue(
        self,
        user_id: str,
        *,
        ttl_seconds: int = 86_400,
        name: str | None = None,
        roles: list[str] | None = None,
    ) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {"sub": user_id, "iat": now, "exp": now + ttl_seconds}
        if name:
            claims["name"] = name
        if roles:
            claims["roles"] = roles
        return jwt.encode(claims, self._secret, algorithm=self._algorithm)

    def verify(self, token: str | None) -> Principal:
        if not token:
            raise AuthError("missing bearer token")
        try:
            # Only our algorithm is accepted: `alg: none` and algorithm confusion fail here.
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[self._algorithm],
                options={"require": ["sub", "exp"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise AuthError("token expired") from exc
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"invalid token: {exc}") from exc
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject or len(subject) > MAX_USER_ID_LENGTH:
            raise AuthError("invalid token: sub must be a user id of 1-100 characters")
        name = claims.get("name")
        roles = claims.get("roles")
        return Principal(
            user_id=subject,
            name=name[:200] if isinstance(name, str) and name else None,
            roles=tuple(r for r in roles if isinstance(r, str)) if isinstance(roles, list) else (),
        )
