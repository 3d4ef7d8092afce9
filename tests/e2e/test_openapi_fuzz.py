"""schemathesis against real server processes: the OpenAPI document is the contract.

The document is generated in-process (`create_app(settings).openapi()`, exactly what
`/openapi.json` serves with DEBUG=true); every generated request goes over the network to a
real `chat-service serve` on SQLite and on PostgreSQL, once with a plain user's token and
once with an admin's. What must hold for every request: no 5xx, every status and content
type the server answers is documented, error bodies match the documented error schema,
schema-valid requests are accepted and schema-invalid ones refused.

Random ids name nothing, so most requests would only ever meet 404s. For positive cases a
path id is therefore swapped, most of the time, for a real resource of the caller's (a
session, a message, a file, an agent answer, an archive): handlers run with real rows
behind them, not just their validation.
"""

from __future__ import annotations

import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from PIL import Image
from schemathesis import Case, CheckContext, Response
from schemathesis.core.parameters import ParameterLocation
from schemathesis.specs.openapi.checks import positive_data_acceptance

from chatservice.api.schemas import OUT_OF_RANGE
from chatservice.app import create_app
from chatservice.auth import TokenCodec
from chatservice.config import Settings
from tests.conftest import BACKENDS, TEST_SECRET, ServerProcess, new_user, start_server

API = "/api/chat"
MAX_EXAMPLES = 25

# Refusals of schema-valid requests that depend on state or on file contents, which no
# schema can describe (like a 404 for an id that names nothing): the operation, the status,
# the error code and, where the code is a generic one, words of the message that say so.
CONTEXTUAL_REFUSALS: list[tuple[str, int, str, str]] = [
    # agent ids are rows of the registry; only the demo agent (1) exists from the start
    ("POST /api/chat/sessions", 422, "UNKNOWN_AGENT", ""),
    # RFC 3339 times near year 1 or 9999 whose UTC equivalent is no date: `date-time`
    # has no bounds to say so
    ("POST /api/chat/sessions", 422, "VALIDATION_ERROR", OUT_OF_RANGE),
    ("GET /api/chat/sessions/{session_id}/messages", 422, "VALIDATION_ERROR", OUT_OF_RANGE),
    # a file's type is judged from its bytes, never from what the client declares
    ("POST /api/chat/sessions/{session_id}/files", 415, "UNSUPPORTED_FILE_TYPE", ""),
    ("POST /api/chat/sessions/{session_id}/files", 415, "FILE_TYPE_MISMATCH", ""),
    ("POST /api/chat/sessions/{session_id}/files", 422, "INVALID_IMAGE", ""),
    ("POST /api/chat/sessions/{session_id}/files", 422, "IMAGE_TOO_LARGE", ""),
    ("POST /api/chat/sessions/{session_id}/files", 422, "EMPTY_FILE", ""),
    # streamed answers exist only in agent sessions
    ("POST /api/chat/sessions/{session_id}/messages/stream", 422, "NOT_AGENT_SESSION", ""),
    # a file message's caption may be emptied, a text message's content may not
    ("PATCH /api/chat/messages/{message_id}", 422, "EMPTY_CONTENT", ""),
    # a range past the end of this particular file
    ("GET /files/{file_id}", 416, "RANGE_NOT_SATISFIABLE", ""),
    ("GET /files/{file_id}/thumb", 416, "RANGE_NOT_SATISFIABLE", ""),
]


def _openapi() -> dict[str, Any]:
    """The document `/openapi.json` serves; building the app opens nothing."""
    config = Settings(
        _env_file=None,  # type: ignore[call-arg]
        jwt_secret_key=TEST_SECRET,
        data_dir=Path(tempfile.gettempdir()) / "chat-service-openapi",
        debug=True,
    )
    return create_app(config).openapi()


schema = schemathesis.openapi.from_dict(
    _openapi(),
    config=schemathesis.Config.from_dict(
        {
            # Every text the service takes refuses NUL (values.py: PostgreSQL cannot store
            # it); OpenAPI has no way to say so once for all strings.
            "generation": {"max-examples": MAX_EXAMPLES, "no-shrink": True, "allow-x00": False},
            "checks": {
                # 413 is how a value over a size limit is refused.
                "negative_data_rejection": {
                    "expected-statuses": [400, 401, 403, 404, 405, 409, 413, 415, 422, 429]
                },
            },
            # The coverage phase's boundary values, then random ones; no stateful phase
            # (pytest runs one operation at a time).
            "phases": {"stateful": {"enabled": False}},
            "request-timeout": 30,
        }
    ),
)


def png() -> bytes:
    buffer = BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


@dataclass
class World:
    """Real resources of one caller on one server, to aim positive cases at."""

    server: ServerProcess
    token: str
    user_id: str
    http: httpx.Client
    peer: str = field(default_factory=lambda: new_user("peer"))
    group: str = ""
    message: str = ""
    agent_session: str = ""
    answer: str = ""
    file: str = ""
    ended: str = ""

    def setup(self) -> World:
        self.group, self.message = self.new_group()
        upload = self.http.post(
            f"{API}/sessions/{self.group}/files",
            files={"file": ("red.png", png(), "image/png")},
        )
        assert upload.status_code == 201, upload.text
        self.file = upload.json()["file_id"]
        self.agent_session = self.post(f"{API}/sessions", {"agent_id": 1})["session_id"]
        with self.http.stream(
            "POST",
            f"{API}/sessions/{self.agent_session}/messages/stream",
            json={"content": "hello"},
        ) as answer:
            for line in answer.iter_lines():
                if line.startswith("data:"):
                    frame = orjson.loads(line[5:])
                    if frame.get("type") == "stream_end":
                        self.answer = frame["message_id"]
        assert self.answer
        self.ended, _ = self.new_group()
        self.post(f"{API}/sessions/{self.ended}/end", None)
        return self

    def post(self, path: str, body: Any) -> Any:
        response = self.http.post(path, json=body)
        assert response.status_code in (200, 201), response.text
        return response.json()

    def new_group(self) -> tuple[str, str]:
        """A group of the caller's with a peer and one message of the caller's."""
        sid = self.post(f"{API}/sessions", {"title": "fuzz", "participants": [self.peer]})[
            "session_id"
        ]
        mid = self.post(f"{API}/sessions/{sid}/messages", {"content": "seed"})["message_id"]
        return sid, mid

    def aim(self, case: Case) -> None:
        """Point a positive case's ids at real resources (three times in four)."""
        if case.meta is None or not case.meta.generation.mode.is_positive:
            return  # a negative case's ids may be the very thing made invalid
        params = case.path_parameters or {}
        if not params or all(_keep(v) for v in params.values()):
            return
        path = case.path
        destructive = case.method == "DELETE" or path.endswith("/end")
        group, message = self.new_group() if destructive else (self.group, self.message)
        for name in params:
            if name == "session_id":
                params[name] = (
                    self.agent_session
                    if path.endswith("/stream")
                    else self.ended
                    if path.endswith("/archive")
                    else group
                )
            elif name == "message_id":
                params[name] = self.answer if path.startswith(f"{API}/streams") else message
            elif name == "file_id":
                params[name] = self.file
            elif name == "user_id":
                params[name] = self.peer


def _keep(value: object) -> bool:
    """A deterministic one-in-four: the generated id is kept, so 404s are exercised too."""
    return zlib.crc32(repr(value).encode("utf-8", "surrogatepass")) % 4 == 0


def positive_data_accepted(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """schemathesis' own check, except for the contextual refusals listed above."""
    try:
        error = response.json()["error"]
    except Exception:
        error = {}
    for label, status, code, words in CONTEXTUAL_REFUSALS:
        if (case.operation.label, response.status_code, error.get("code")) == (
            label,
            status,
            code,
        ) and words in str(error.get("message")):
            return None
    return positive_data_acceptance(ctx, response, case)


@pytest.fixture(scope="module", params=BACKENDS)
def fuzz_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    url = None if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    # The demo agent without pauses: every streamed answer ends within milliseconds.
    proc = start_server(
        tmp_path_factory.mktemp(f"openapi-{request.param}"),
        url,
        STREAM_DELAY_MS=0,
        STREAM_CHUNK_SIZE=100,
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module", params=["user", "admin"])
def world(request: pytest.FixtureRequest, fuzz_server: ServerProcess) -> Iterator[World]:
    user_id = new_user(f"fuzz-{request.param}")
    roles = ["admin"] if request.param == "admin" else None
    token = TokenCodec(TEST_SECRET).issue(user_id, roles=roles)
    with httpx.Client(
        base_url=fuzz_server.base_url, headers={"Authorization": f"Bearer {token}"}, timeout=30
    ) as http:
        yield World(fuzz_server, token, user_id, http).setup()
    # A server that answered everything must still be healthy.
    assert httpx.get(f"{fuzz_server.base_url}/healthz").status_code == 200


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_openapi_contract(case: Case, world: World) -> None:
    world.aim(case)
    headers = {"Authorization": f"Bearer {world.token}"}
    if case.meta is not None and case.meta.is_negative_at(ParameterLocation.HEADER):
        # The header made invalid is the bearer token (the only required one): keep it so.
        headers = {}
    case.call_and_validate(
        base_url=world.server.base_url,
        headers=headers,
        excluded_checks=[positive_data_acceptance],
        additional_checks=[positive_data_accepted],
    )
