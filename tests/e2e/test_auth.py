"""Authentication (401 / close 4401) and authorisation (403 / 4403, 404 / 4404)."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import httpx
import jwt
import pytest

from chatservice.auth import TokenCodec
from tests.conftest import TEST_SECRET, ServerProcess, new_user
from tests.e2e.conftest import User, Users, bearer, close_code, recv_until, ws_connect

API = "/api/chat"

# The HS512 token is signed with the servers' (short for HS512) secret on purpose.
pytestmark = pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def bad_tokens(user_id: str) -> dict[str, str | None]:
    """Tokens the server must refuse, by name. None means no token at all."""
    now = int(time.time())
    claims = {"sub": user_id, "iat": now, "exp": now + 3600}
    return {
        "missing": None,
        "malformed": "not-a-jwt",
        "garbage-segments": "aaa.bbb.ccc",
        "expired": TokenCodec(TEST_SECRET).issue(user_id, ttl_seconds=-120),
        "forged": TokenCodec("another-secret-" + "x" * 40).issue(user_id),
        "alg-none": f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}.",
        "alg-none-signed": f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}.c2ln",
        "other-algorithm": jwt.encode(claims, TEST_SECRET, algorithm="HS512"),
        "no-sub": jwt.encode({"iat": now, "exp": now + 3600}, TEST_SECRET, algorithm="HS256"),
        "no-exp": jwt.encode({"sub": user_id, "iat": now}, TEST_SECRET, algorithm="HS256"),
        "sub-too-long": jwt.encode(
            {"sub": "u" * 101, "exp": now + 3600}, TEST_SECRET, algorithm="HS256"
        ),
        "sub-not-string": jwt.encode(
            {"sub": 42, "exp": now + 3600}, TEST_SECRET, algorithm="HS256"
        ),
    }


BAD_TOKEN_KINDS = [
    "missing",
    "malformed",
    "garbage-segments",
    "expired",
    "forged",
    "alg-none",
    "alg-none-signed",
    "other-algorithm",
    "no-sub",
    "no-exp",
    "sub-too-long",
    "sub-not-string",
]


def session_endpoints(sid: str) -> list[tuple[str, str, dict[str, object] | None]]:
    return [
        ("POST", f"{API}/sessions", {"title": "t"}),
        ("GET", f"{API}/sessions", None),
        ("GET", f"{API}/sessions/{sid}", None),
        ("DELETE", f"{API}/sessions/{sid}", None),
        ("POST", f"{API}/sessions/{sid}/end", None),
        ("POST", f"{API}/sessions/{sid}/read", {"seq": 1}),
        ("GET", f"{API}/sessions/{sid}/messages", None),
        ("POST", f"{API}/sessions/{sid}/messages", {"content": "hi"}),
    ]


def naming_endpoints(sid: str) -> list[tuple[str, str, dict[str, object] | None]]:
    """Every endpoint whose path names a session."""
    return [e for e in session_endpoints(sid) if sid in e[1]]


async def _victim_session(users: Users) -> tuple[User, str]:
    owner = users("owner")
    sid = (await owner.client.create_session(title="private"))["session_id"]
    await owner.client.send_message(sid, "secret")
    return owner, sid


def _assert_error(response: httpx.Response, status: int, codes: tuple[str, ...]) -> None:
    assert response.status_code == status, (response.request.url, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] in codes, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


@pytest.mark.parametrize("kind", BAD_TOKEN_KINDS)
async def test_bad_token_is_401_on_every_endpoint(
    http: httpx.AsyncClient, users: Users, kind: str
) -> None:
    owner, sid = await _victim_session(users)
    tokens = bad_tokens(owner.id)
    assert set(tokens) == set(BAD_TOKEN_KINDS)
    token = tokens[kind]
    headers = bearer(token) if token is not None else {}
    for method, path, body in session_endpoints(sid):
        response = await http.request(method, path, headers=headers, json=body)
        _assert_error(response, 401, ("UNAUTHORIZED",))
        assert response.headers.get("www-authenticate", "").lower().startswith("bearer")
    # Nothing happened to the session.
    detail = await owner.client.get_session(sid)
    assert detail["status"] == "active" and detail["message_count"] == 1


async def test_other_auth_schemes_are_401(http: httpx.AsyncClient, users: Users) -> None:
    owner, sid = await _victim_session(users)
    for header in (
        f"Basic {owner.token}",
        owner.token,  # no scheme
        "Bearer",
        "Bearer two words",
    ):
        response = await http.get(f"{API}/sessions/{sid}", headers={"Authorization": header})
        _assert_error(response, 401, ("UNAUTHORIZED",))
    # The token in the query string is for WebSocket only.
    response = await http.get(f"{API}/sessions/{sid}", params={"token": owner.token})
    _assert_error(response, 401, ("UNAUTHORIZED",))


async def test_auth_is_checked_before_the_body(http: httpx.AsyncClient) -> None:
    response = await http.post(f"{API}/sessions", content=b"{not json")
    _assert_error(response, 401, ("UNAUTHORIZED",))
    response = await http.post(f"{API}/sessions", json={"participants": "nope"})
    _assert_error(response, 401, ("UNAUTHORIZED",))


@pytest.mark.parametrize("kind", BAD_TOKEN_KINDS)
async def test_bad_token_closes_websocket_with_4401(
    server: ServerProcess, users: Users, kind: str
) -> None:
    owner, sid = await _victim_session(users)
    token = bad_tokens(owner.id)[kind]
    ws = await ws_connect(server, sid, token)
    try:
        assert await close_code(ws) == 4401
    finally:
        await ws.close()
    # The same token in the Authorization header is refused the same way.
    if token is not None:
        ws = await ws_connect(server, sid, additional_headers=bearer(token))
        try:
            assert await close_code(ws) == 4401
        finally:
            await ws.close()


async def test_websocket_accepts_the_authorization_header(
    server: ServerProcess, users: Users
) -> None:
    owner, sid = await _victim_session(users)
    ws = await ws_connect(server, sid, additional_headers=owner.headers)
    try:
        await ws.send(json.dumps({"type": "ping"}))
        assert (await recv_until(ws, "pong"))["type"] == "pong"
    finally:
        await ws.close()


async def test_non_participant_gets_403_on_every_session_path(
    http: httpx.AsyncClient, users: Users
) -> None:
    owner, sid = await _victim_session(users)
    stranger = users("stranger")
    for method, path, body in naming_endpoints(sid):
        response = await http.request(method, path, headers=stranger.headers, json=body)
        _assert_error(response, 403, ("FORBIDDEN",))
        assert "secret" not in response.text
    detail = await owner.client.get_session(sid)
    assert detail["status"] == "active"
    assert detail["message_count"] == 1
    assert detail["participants"] == [owner.id]


async def test_non_participant_websocket_is_closed_with_4403(
    server: ServerProcess, users: Users
) -> None:
    _, sid = await _victim_session(users)
    stranger = users("stranger")
    ws = await ws_connect(server, sid, stranger.token, since_seq=0)
    try:
        frames = []
        with pytest.raises(Exception):  # noqa: B017 - any close, checked below
            while True:
                frames.append(await asyncio.wait_for(ws.recv(), 5))
        assert ws.close_code == 4403
        assert frames == []  # no replay of the history leaked before the close
    finally:
        await ws.close()


async def test_unknown_session_is_404_on_every_path_and_ws_4404(
    server: ServerProcess, http: httpx.AsyncClient, users: Users
) -> None:
    alice = users("alice")
    for sid in ("sess_doesnotexist0000000000000", "x"):
        for method, path, body in naming_endpoints(sid):
            response = await http.request(method, path, headers=alice.headers, json=body)
            _assert_error(response, 404, ("NOT_FOUND", "SESSION_NOT_FOUND"))
        ws = await ws_connect(server, sid, alice.token)
        try:
            assert await close_code(ws) == 4404
        finally:
            await ws.close()


async def test_session_list_shows_only_the_callers_sessions(users: Users) -> None:
    alice, bob, carol = users("alice"), users("bob"), users("carol")
    shared = (await alice.client.create_session(title="ab", participants=[bob.id]))["session_id"]
    alice_only = (await alice.client.create_session(title="a"))["session_id"]
    carol_only = (await carol.client.create_session(title="c"))["session_id"]

    def ids(body: dict[str, object]) -> set[str]:
        return {s["session_id"] for s in body["sessions"]}  # type: ignore[attr-defined]

    assert ids(await alice.client.list_sessions()) == {shared, alice_only}
    assert ids(await bob.client.list_sessions()) == {shared}
    assert ids(await carol.client.list_sessions()) == {carol_only}
    nobody = users("nobody")
    empty = await nobody.client.list_sessions()
    assert empty == {"sessions": [], "total": 0, "has_more": False}


async def test_token_subject_is_the_identity(http: httpx.AsyncClient, tokens: TokenCodec) -> None:
    """The creator is whoever `sub` names, not anything in the body."""
    me = new_user("me")
    response = await http.post(
        f"{API}/sessions",
        headers=bearer(tokens.issue(me)),
        json={"title": "t", "user_id": "someone-else"},
    )
    assert response.status_code == 201
    assert response.json()["user_id"] == me


async def test_tokens_are_not_written_to_the_server_log(
    server: ServerProcess, users: Users
) -> None:
    """`?token=` carries a bearer credential: the access log must not keep a usable copy."""
    owner, sid = await _victim_session(users)
    ws = await ws_connect(server, sid, owner.token)
    try:
        await recv_until(ws, "system")
    finally:
        await ws.close()
    await owner.client.get_session(sid)  # and a REST call with the header
    await asyncio.sleep(0.3)  # let the log line reach the file
    signature = owner.token.rsplit(".", 1)[1]
    leaked = [line[:160] for line in server.log().splitlines() if signature in line]
    assert leaked == [], f"bearer token written to the server log: {leaked[:1]}"
