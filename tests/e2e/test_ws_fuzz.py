"""WebSocket frames fuzzed with hypothesis against real server processes.

One connection (alice's) gets every generated frame: each frame type of `api/frames.py`
with each field given values of the right and of every wrong type, unknown types, JSON
that is no object, text that is no JSON, binary frames, texts near WS_MESSAGE_SIZE_LIMIT in
bytes and in characters. What must hold after each frame:

- alice's connection answers only frames of the protocol; an `error` names a documented
  code and a message, and never INTERNAL (a handler that failed);
- alice's connection stays open and still sends and receives (a message of hers comes
  back to her, and reaches bob's connection to the same session).

Afterwards the process is healthy, logged no error, and the whole history replays
(`since_seq=0`) and reads over REST: nothing stored by a fuzzed frame breaks a later
reader. Frames over the hard limit are closed with 1009, and the room carries on.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from chatservice.auth import TokenCodec
from tests.conftest import BACKENDS, TEST_SECRET, ServerProcess, new_user, start_server

API = "/api/chat"
LIMIT = 2048  # WS_MESSAGE_SIZE_LIMIT of the fuzzed servers: small, so sizes are cheap
HARD_LIMIT = 1_048_576  # max(4 * LIMIT, 1 MiB): frames above are closed with 1009
MAX_EXAMPLES = 200

SERVER_FRAMES = {
    "connected",
    "message",
    "stream_start",
    "stream_chunk",
    "stream_end",
    "typing",
    "receipt",
    "system",
    "message_updated",
    "message_deleted",
    "error",
    "pong",
}
# What a frame can be refused with (README's error codes, with the precise not-found ones).
ERROR_CODES = {
    "BAD_JSON",
    "BAD_FRAME",
    "UNKNOWN_TYPE",
    "FRAME_TOO_LARGE",
    "VALIDATION_ERROR",
    "EMPTY_CONTENT",
    "CONTENT_TOO_LARGE",
    "RATE_LIMIT",
    "FORBIDDEN",
    "NOT_FOUND",
    "MESSAGE_NOT_FOUND",
    "FILE_NOT_FOUND",
    "STREAM_NOT_FOUND",
    "SESSION_CLOSED",
    "FILE_NOT_ATTACHABLE",
    "CLIENT_MSG_ID_REUSED",
}

# -- strategies --------------------------------------------------------------------------

# Numbers at the edges of what JSON parsers, 64-bit columns and PostgreSQL's JSONB
# (which gives 1e20 back as an integer) make of them.
edge_numbers = st.sampled_from(
    [2**53 - 1, 2**53, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 1e20, -1e300, 9.2e18, 5e-324]
)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | edge_numbers
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
# Texts of about LIMIT bytes, in 1- to 4-byte characters: the limit counts bytes.
sized_texts = st.builds(
    lambda char, target: char * max(1, target // len(char.encode())),
    st.sampled_from(["a", "é", "한", "😀", " "]),
    st.integers(min_value=LIMIT - 80, max_value=LIMIT + 80),
)
texts = st.text(max_size=40) | sized_texts
ids = st.text(min_size=0, max_size=120) | st.sampled_from(["msg_0", "file_0", "x" * 100])

FIELDS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "message": {
        "content": texts | json_values,
        "client_msg_id": ids | json_values,
        "metadata": st.dictionaries(st.text(max_size=8), json_values, min_size=1, max_size=4)
        | st.dictionaries(st.text(max_size=8), edge_numbers, min_size=1, max_size=2)
        | json_values,
    },
    "typing": {"is_typing": st.booleans() | json_values},
    "read": {
        "seq": st.integers(min_value=-5, max_value=50)
        | st.integers(min_value=-(2**70), max_value=2**70)
        | json_values
    },
    "ping": {},
    "cancel": {"message_id": ids | json_values},
    "file": {"file_id": ids | json_values, "message": texts | json_values, "client_msg_id": ids},
}


@st.composite
def frame_objects(draw: st.DrawFn) -> dict[str, Any]:
    """A frame of a known type: any subset of its fields, any values, perhaps extras."""
    # Half of them messages: the frame that stores what it carries.
    kind = draw(st.just("message") | st.sampled_from(sorted(FIELDS)))
    frame: dict[str, Any] = {"type": kind}
    for name, values in FIELDS[kind].items():
        if draw(st.booleans()) or name in ("content", "metadata", "seq", "is_typing"):
            frame[name] = draw(values)
    frame.update(draw(st.dictionaries(st.text(max_size=10), json_values, max_size=2)))
    frame["type"] = kind
    return frame


unknown_types = st.fixed_dictionaries(
    {"type": json_values | st.text(max_size=30)}, optional={"content": texts}
)
non_objects = json_values.filter(lambda value: not isinstance(value, dict))


def _dumps(value: Any) -> str:
    # ensure_ascii: lone surrogates go out as escapes, which the server must refuse itself.
    return json.dumps(value)


frames: st.SearchStrategy[str | bytes] = st.one_of(
    frame_objects().map(_dumps),
    frame_objects().map(_dumps),  # twice: the frames most worth getting right
    unknown_types.map(_dumps),
    non_objects.map(_dumps),
    st.text(st.characters(codec="utf-8"), max_size=60),  # mostly not JSON
    sized_texts,
    st.binary(max_size=64),
    st.builds(lambda text: text.encode(), frame_objects().map(_dumps)),  # a frame, but binary
)

# -- a room with two connections ---------------------------------------------------------


def _connect(server: ServerProcess, session_id: str, token: str, **params: Any) -> ClientConnection:
    query = "&".join(f"{k}={v}" for k, v in {"token": token, **params}.items())
    return connect(
        f"{server.ws_url}/ws/{session_id}?{query}",
        compression=None,  # sizes on the wire are the sizes the server judges
        proxy=None,
        max_size=None,
        open_timeout=10,
    )


def _recv(ws: ClientConnection, timeout: float = 10.0) -> dict[str, Any]:
    raw = ws.recv(timeout=timeout)
    assert isinstance(raw, str), f"the server sent a binary frame: {raw!r}"
    frame = json.loads(raw)
    assert isinstance(frame, dict), frame
    return frame


def assert_protocol_frame(frame: dict[str, Any]) -> None:
    assert frame.get("type") in SERVER_FRAMES, frame
    if frame["type"] == "error":
        assert frame.get("code") in ERROR_CODES, frame
        assert isinstance(frame.get("message"), str) and frame["message"], frame


@dataclass
class Room:
    server: ServerProcess
    session_id: str
    alice: str
    bob: str
    fuzzed: ClientConnection
    observer: ClientConnection
    sent: list[str] = field(default_factory=list)

    def barrier(self) -> list[dict[str, Any]]:
        """alice sends a message: every frame she gets before its echo is checked, then bob
        must get it too. Returns what alice got before the echo."""
        cid = uuid.uuid4().hex
        self.fuzzed.send(
            json.dumps({"type": "message", "content": "still here", "client_msg_id": cid})
        )
        self.sent.append(cid)
        before: list[dict[str, Any]] = []
        while True:
            frame = _recv(self.fuzzed)
            assert_protocol_frame(frame)
            if frame["type"] == "message" and frame.get("client_msg_id") == cid:
                break
            assert frame.get("client_msg_id") != cid, frame  # an error for the barrier
            before.append(frame)
        while True:
            frame = _recv(self.observer)
            assert_protocol_frame(frame)
            if frame["type"] == "message" and frame.get("client_msg_id") == cid:
                return before


@pytest.fixture(scope="module", params=BACKENDS)
def ws_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    url = None if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    proc = start_server(
        tmp_path_factory.mktemp(f"ws-fuzz-{request.param}"), url, WS_MESSAGE_SIZE_LIMIT=LIMIT
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def room(ws_server: ServerProcess) -> Iterator[Room]:
    codec = TokenCodec(TEST_SECRET)
    alice, bob = new_user("fuzz-alice"), new_user("fuzz-bob")
    token_a, token_b = codec.issue(alice), codec.issue(bob)
    created = httpx.post(
        f"{ws_server.base_url}{API}/sessions",
        json={"title": "fuzz", "participants": [bob]},
        headers={"Authorization": f"Bearer {token_a}"},
    )
    assert created.status_code == 201, created.text
    sid = created.json()["session_id"]
    with _connect(ws_server, sid, token_a) as fuzzed, _connect(ws_server, sid, token_b) as observer:
        for ws in (fuzzed, observer):
            assert _recv(ws)["type"] == "connected"
        yield Room(ws_server, sid, alice, bob, fuzzed, observer)


# -- the tests ---------------------------------------------------------------------------


@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(frame=frames)
def test_every_frame_is_answered_within_the_protocol_and_the_room_carries_on(
    room: Room, frame: str | bytes
) -> None:
    room.fuzzed.send(frame)
    for answer in room.barrier():
        assert answer.get("code") != "INTERNAL", (frame, answer)


def test_frames_at_and_over_the_limits(room: Room) -> None:
    """LIMIT bytes pass, one more is FRAME_TOO_LARGE, the hard limit too; past the hard
    limit (text or binary) the connection is closed with 1009 and everyone else goes on."""
    envelope = '{"type": "message", "client_msg_id": "exact", "content": "%s"}'
    room_left = LIMIT - len((envelope % "").encode())
    exact = envelope % ("é" * (room_left // 2))  # 2 bytes a character
    exact += " " * (LIMIT - len(exact.encode()))  # whitespace after the object: still JSON
    assert len(exact.encode()) == LIMIT
    room.fuzzed.send(exact)
    assert not [f for f in room.barrier() if f["type"] == "error"]
    for size in (LIMIT + 1, HARD_LIMIT):
        room.fuzzed.send(exact + " " * (size - LIMIT))
        errors = [f for f in room.barrier() if f["type"] == "error"]
        assert [e["code"] for e in errors] == ["FRAME_TOO_LARGE"], errors
    token = TokenCodec(TEST_SECRET).issue(room.alice)
    for huge in ("x" * (HARD_LIMIT + 1), b"x" * (HARD_LIMIT + 1)):
        with _connect(room.server, room.session_id, token) as doomed:
            assert _recv(doomed)["type"] == "connected"
            doomed.send(huge)
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    _recv(doomed)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        room.barrier()  # the other connections of the same user and session carry on


def test_after_the_fuzzing_the_service_and_the_history_are_intact(room: Room) -> None:
    base = room.server.base_url
    assert httpx.get(f"{base}/healthz").status_code == 200
    token = TokenCodec(TEST_SECRET).issue(room.bob)
    # Everything stored (fuzzed messages too) replays from seq 0 and reads over REST.
    with _connect(room.server, room.session_id, token, since_seq=0) as replay:
        assert _recv(replay)["type"] == "connected"
        replayed = set()
        while room.sent[-1] not in replayed:
            frame = _recv(replay)
            assert_protocol_frame(frame)
            assert frame["type"] != "error", frame
            replayed.add(frame.get("client_msg_id"))
        assert set(room.sent) <= replayed
    history = httpx.get(
        f"{base}{API}/sessions/{room.session_id}/messages",
        params={"limit": 200},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert history.status_code == 200, history.text
    transcript = httpx.get(
        f"{base}{API}/sessions/{room.session_id}/transcript",
        params={"format": "json"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert transcript.status_code == 200, transcript.text
    errors = [line for line in room.server.log().splitlines() if '"level":"ERROR"' in line]
    assert not errors, errors[:3]
