"""Bearer tokens: HMAC-signed JWTs whose `sub` is the user id."""

from __future__ import annotations

import math
import time
from typing import Any

import jwt

from chatservice.domain import Principal
from chatservice.values import UnacceptableValue, check_text

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
        # Our own words, not the library's: its messages name its internals.
        except jwt.ExpiredSignatureError as exc:
            raise AuthError("token expired") from exc
        except jwt.ImmatureSignatureError as exc:
            raise AuthError("token not valid yet") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"invalid token: no {exc.claim} claim") from exc
        except jwt.InvalidSignatureError as exc:
            raise AuthError("invalid token: bad signature") from exc
        except jwt.InvalidTokenError as exc:
            raise AuthError("invalid token") from exc
        for claim in ("exp", "nbf", "iat"):
            value = claims.get(claim)
            # PyJWT takes "123" as a time; a claim of the wrong type is a forged or broken
            # token, not a time.
            if claim in claims and (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
            ):
                raise AuthError(f"invalid token: {claim} must be a number")
        subject = claims.get("sub")
        if not _sane_user_id(subject):
            raise AuthError(
                f"invalid token: sub must be a user id of 1-{MAX_USER_ID_LENGTH} printable "
                "characters"
            )
        name = claims.get("name")
        roles = claims.get("roles")
        return Principal(
            user_id=str(subject),
            name=_display_name(name),
            roles=tuple(r for r in roles if _printable(r)) if isinstance(roles, list) else (),
            expires_at=float(claims["exp"]),
        )


def _printable(value: object) -> bool:
    if not isinstance(value, str) or not value:
        return False
    try:
        check_text(value, "")
    except UnacceptableValue:
        return False
    return value.isprintable()


def _sane_user_id(value: object) -> bool:
    return (
        _printable(value)
        and isinstance(value, str)
        and len(value) <= MAX_USER_ID_LENGTH
        and value.strip() == value
    )


def _display_name(value: object) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    cleaned = "".join(ch for ch in value[:200] if ch.isprintable())
    try:
        check_text(cleaned, "")
    except UnacceptableValue:
        return None
    return cleaned or None
