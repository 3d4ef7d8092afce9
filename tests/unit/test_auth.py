from __future__ import annotations

import time

import jwt
import pytest

from chatservice.auth import AuthError, TokenCodec

SECRET = "unit-test-secret-with-enough-length-for-hs256"


def codec() -> TokenCodec:
    return TokenCodec(SECRET)


def test_issued_tokens_verify_to_their_principal() -> None:
    token = codec().issue("alice", name="Alice", roles=["admin"])
    principal = codec().verify(token)
    assert principal.user_id == "alice"
    assert principal.name == "Alice"
    assert principal.roles == ("admin",)


@pytest.mark.parametrize("token", [None, "", "garbage", "a.b.c"])
def test_missing_or_malformed_tokens_are_refused(token: str | None) -> None:
    with pytest.raises(AuthError):
        codec().verify(token)


def test_expired_tokens_are_refused() -> None:
    token = jwt.encode({"sub": "alice", "exp": int(time.time()) - 10}, SECRET, algorithm="HS256")
    with pytest.raises(AuthError, match="expired"):
        codec().verify(token)


def test_tokens_signed_with_another_secret_are_refused() -> None:
    token = TokenCodec("another-secret-that-is-also-long-enough").issue("alice")
    with pytest.raises(AuthError):
        codec().verify(token)


def test_unsigned_alg_none_tokens_are_refused() -> None:
    token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, None, algorithm="none")
    with pytest.raises(AuthError):
        codec().verify(token)


@pytest.mark.parametrize(
    "claims",
    [
        {"exp": 4_000_000_000},  # no sub
        {"sub": "alice"},  # no exp
        {"sub": "", "exp": 4_000_000_000},
        {"sub": "x" * 101, "exp": 4_000_000_000},
        {"sub": 42, "exp": 4_000_000_000},
    ],
)
def test_tokens_without_a_usable_subject_or_expiry_are_refused(claims: dict[str, object]) -> None:
    with pytest.raises(AuthError):
        codec().verify(jwt.encode(claims, SECRET, algorithm="HS256"))
