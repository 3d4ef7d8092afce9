#!/usr/bin/env python
"""How to put an event on the bus: the encodings the envelope could use, measured.

    .venv/bin/python bench/envelope.py                       # JSON encodings only
    .tools/bin/uv run --with msgpack python bench/envelope.py  # msgpack too

For a chat message (about 400 bytes of JSON), a long message (4 KB of text) and an agent
stream chunk, it times, per event, what the publisher pays to encode an envelope it has
built, and what each hub pays to get from the bytes to the `Envelope` it routes (header
fields set, the native frame's bytes at hand):

- `full-json`: the native event as JSON, header fields inside it; a hub parses all of it
  to find them (the service's encoding before the envelope: a client frame on the bus);
- `json-header`: a compact JSON header, a newline, the native JSON payload untouched (what
  `Envelope.encode` writes);
- `msgpack-header`: the same with a msgpack header (only if msgpack is installed);
- `msgpack-full`: header fields and the event in one msgpack map; the native frame is
  re-encoded as JSON on every hub (only if msgpack is installed).

Each figure is the best of 5 rounds of 200,000 events, in microseconds per event.
"""

from __future__ import annotations

import functools
import sys
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from chatservice.envelope import Envelope

MESSAGE: dict[str, Any] = {
    "type": "message",
    "message_id": "msg_01m91g05kan95exqrmc1fynx85",
    "session_id": "sess_01m91g05kan95exqrmc1fynx85",
    "seq": 123456,
    "sender_type": "user",
    "sender_id": "user-7f3a9c",
    "message_type": "text",
    "content": "Are we still on for the review at three? I moved the notes to the shared folder.",
    "metadata": {"client": "web", "t": 1733350000.123},
    "client_msg_id": "c-0001-7f3a9c",
    "is_edited": False,
    "created_at": "2026-12-04T21:37:16.123456Z",
    "timestamp": "2026-12-04T21:37:16.123456Z",
}
CHUNK: dict[str, Any] = {
    "type": "stream_chunk",
    "session_id": "sess_01m91g05kan95exqrmc1fynx85",
    "message_id": "msg_01m91g05kan95exqrmc1fynx86",
    "content": "the answer goes on ",
    "index": 41,
}
ROUNDS, NUMBER = 5, 200_000


def best(fn: Callable[[], object]) -> float:
    return min(timeit.repeat(fn, number=NUMBER, repeat=ROUNDS)) / NUMBER * 1e6


def from_event(event: dict[str, Any], payload: bytes) -> Envelope:
    """A hub's envelope from a fully parsed event (the full-JSON candidates)."""
    made = Envelope.of(event)
    made.payload = payload
    return made


def candidates(
    event: dict[str, Any],
) -> dict[str, tuple[Callable[[], bytes], Callable[[bytes], Envelope]]]:
    envelope = Envelope.of(event)
    found: dict[str, tuple[Callable[[], bytes], Callable[[bytes], Envelope]]] = {
        "full-json": (
            lambda: orjson.dumps(event),
            lambda data: from_event(orjson.loads(data), data),
        ),
        "json-header": (envelope.encode, Envelope.decode),
    }
    try:
        import msgpack  # type: ignore[import-untyped]
    except ImportError:
        return found
    head = orjson.loads(envelope.encode().split(b"\n", 1)[0])

    def msgpack_header_decode(data: bytes) -> Envelope:
        unpacker = msgpack.Unpacker()
        unpacker.feed(data)
        parsed = unpacker.unpack()
        return Envelope.from_header(parsed, data[unpacker.tell() :])

    def msgpack_full_decode(data: bytes) -> Envelope:
        parsed = msgpack.unpackb(data)
        return from_event(parsed["e"], orjson.dumps(parsed["e"]))

    found["msgpack-header"] = (
        lambda: msgpack.packb(head) + envelope.payload,
        msgpack_header_decode,
    )
    found["msgpack-full"] = (lambda: msgpack.packb({**head, "e": event}), msgpack_full_decode)
    return found


def main() -> None:
    print(f"best of {ROUNDS} x {NUMBER:,} events; microseconds per event")
    print(f"{'event':<8} {'encoding':<16} {'bytes':>6} {'encode':>8} {'decode':>8}")
    long = {**MESSAGE, "content": "All work and no play makes Jack a dull boy. " * 93}
    for name, event in (("message", MESSAGE), ("long", long), ("chunk", CHUNK)):
        for encoding, (encode, decode) in candidates(event).items():
            data = encode()
            decoded = decode(data)
            assert (decoded.kind, decoded.seq) == (event["type"], event.get("seq"))
            assert orjson.loads(decoded.payload) == event
            print(
                f"{name:<8} {encoding:<16} {len(data):>6} {best(encode):>8.2f}"
                f" {best(functools.partial(decode, data)):>8.2f}"
            )


if __name__ == "__main__":
    main()
