"""The event envelope: how an event travels on the bus from a service to every hub.

An envelope is a small header and a payload. The header says what the hub needs to
route, order and de-duplicate the event: its type, its audience (everyone following a
session, or every connection of one user), the message `seq`, the agent stream and chunk
index, the user who caused it, and a trace id. The payload is the event in the native
protocol's JSON, encoded once by the service that published it.

On the wire the header is compact JSON, then a newline, then the payload bytes (orjson
never writes a raw newline, so the first one ends the header). A hub decodes only the
header; the native codec forwards the payload bytes as they came, and another protocol's
codec parses the payload once per event (`Envelope.event`) for all its connections.
The encoding was chosen by measurement: `bench/envelope.py` and its figures in
`bench/README.md`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from chatservice.domain import JSON

# Event types that carry a persisted message's `seq` and are delivered in seq order.
SEQUENCED_TYPES = frozenset({"message", "stream_end"})
# Frames of an agent answer in progress; `message_id` names the stream.
STREAM_TYPES = frozenset({"stream_start", "stream_chunk", "stream_end"})


class BadEnvelope(ValueError):
    """Bytes on the bus that are not an envelope (another program on the channel)."""


@dataclass(slots=True, eq=False)
class Envelope:
    kind: str
    payload: bytes
    session_id: str | None = None  # audience: everyone following this session
    user_id: str | None = None  # audience: every connection of this user
    seq: int | None = None
    stream_id: str | None = None
    chunk: int | None = None  # a stream's chunk index; its start counts as -1
    actor: str | None = None  # the user the event is about (typing, joins, removals)
    trace: str | None = None
    # What codecs made of this event, by codec name: one encoding per event per instance.
    frames: dict[str, Any] = field(default_factory=dict)
    _event: JSON | None = None

    @classmethod
    def of(cls, event: JSON, *, user_id: str | None = None, trace: str | None = None) -> Envelope:
        """Wrap a native event, reading its header fields from it once, at publish time."""
        kind = str(event["type"])
        seq = event.get("seq") if kind in SEQUENCED_TYPES else None
        stream_id = event.get("message_id") if kind in STREAM_TYPES else None
        chunk = (
            event.get("index") if kind == "stream_chunk" else -1 if kind == "stream_start" else None
        )
        actor = event.get("user_id") if kind in ("typing", "system", "receipt") else None
        envelope = cls(
            kind=kind,
            payload=orjson.dumps(event),
            session_id=event.get("session_id"),
            user_id=user_id,
            seq=seq if isinstance(seq, int) else None,
            stream_id=stream_id if isinstance(stream_id, str) else None,
            chunk=chunk if isinstance(chunk, int) else None,
            actor=actor if isinstance(actor, str) else None,
            trace=trace,
        )
        envelope._event = event
        return envelope

    @property
    def event(self) -> JSON:
        """The payload as a JSON object, parsed at most once."""
        if self._event is None:
            value = orjson.loads(self.payload)
            if not isinstance(value, dict):
                raise BadEnvelope("an envelope's payload is a JSON object")
            self._event = value
        return self._event

    def encode(self) -> bytes:
        head: dict[str, Any] = {"t": self.kind}
        for key, value in (
            ("s", self.session_id),
            ("u", self.user_id),
            ("q", self.seq),
            ("m", self.stream_id),
            ("i", self.chunk),
            ("a", self.actor),
            ("x", self.trace),
        ):
            if value is not None:
                head[key] = value
        return orjson.dumps(head) + b"\n" + self.payload

    @classmethod
    def decode(cls, data: bytes) -> Envelope:
        end = data.find(b"\n")
        if end < 0:
            raise BadEnvelope("no envelope header")
        try:
            head = orjson.loads(data[:end])
        except orjson.JSONDecodeError as exc:
            raise BadEnvelope("unreadable envelope header") from exc
        return cls.from_header(head, data[end + 1 :])

    @classmethod
    def from_header(cls, head: object, payload: bytes) -> Envelope:
        """An envelope from its decoded header; fields of the wrong type are dropped."""
        if not isinstance(head, dict) or not isinstance(head.get("t"), str):
            raise BadEnvelope("an envelope header names its type")
        get = head.get
        return cls(
            head["t"],
            payload,
            _text(get("s")),
            _text(get("u")),
            _number(get("q")),
            _text(get("m")),
            _number(get("i")),
            _text(get("a")),
            _text(get("x")),
        )


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _number(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
