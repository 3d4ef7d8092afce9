"""Codecs: how one wire protocol writes the hub's events and closings.

A codec turns an envelope into its protocol's frame, once per event per instance
(`frame_for` keeps the result on the envelope, so a thousand connections of one
protocol cost one encoding), frames of the connection itself (`connected`, `error`,
`pong`, …) into its protocol's text, and a typed closing reason into its protocol's
close code. Adding a protocol is a codec plus a transport adapter that reads its frames
and calls the services; `docs/architecture.md` walks through the native one.
"""

from __future__ import annotations

import enum
from typing import ClassVar, Protocol

import orjson

from chatservice.domain import JSON
from chatservice.envelope import Envelope


class CloseReason(enum.Enum):
    """Why the server ends a connection, whatever the protocol says it with."""

    NORMAL = "normal"
    SERVICE_RESTART = "service_restart"  # the server is stopping
    TRY_AGAIN_LATER = "try_again_later"  # at its connection limit
    SLOW_CONSUMER = "slow_consumer"  # the client does not read fast enough
    UNAUTHORIZED = "unauthorized"  # no valid token, or it expired
    FORBIDDEN = "forbidden"  # not (or no longer) a participant; origin refused
    NOT_FOUND = "not_found"  # the session does not exist (or was deleted)
    BAD_REQUEST = "bad_request"  # the connection request itself is malformed
    INTERNAL = "internal"  # a dependency failed; reconnect and resume


class Codec(Protocol):
    name: str

    def frame(self, envelope: Envelope) -> bytes | None:
        """The protocol's frame for an event, as UTF-8 text; None when the protocol has
        none for it."""

    def control(self, frame: JSON) -> bytes:
        """A frame of the connection itself (connected, subscribed, error, pong, …)."""

    def close_code(self, reason: CloseReason) -> int: ...


def frame_for(codec: Codec, envelope: Envelope) -> bytes | None:
    """`codec.frame(envelope)`, computed once per event and codec on this instance."""
    frames = envelope.frames
    try:
        return frames[codec.name]  # type: ignore[no-any-return]
    except KeyError:
        frame = frames[codec.name] = codec.frame(envelope)
        return frame


class NativeCodec:
    """The native protocol: the event's own JSON, as the publisher encoded it."""

    name = "native"

    CLOSE_CODES: ClassVar[dict[CloseReason, int]] = {
        CloseReason.NORMAL: 1000,
        # uvicorn closes its WebSockets with 1012 on shutdown too.
        CloseReason.SERVICE_RESTART: 1012,
        CloseReason.TRY_AGAIN_LATER: 1013,
        CloseReason.INTERNAL: 1011,
        CloseReason.SLOW_CONSUMER: 4008,
        CloseReason.BAD_REQUEST: 4400,
        CloseReason.UNAUTHORIZED: 4401,
        CloseReason.FORBIDDEN: 4403,
        CloseReason.NOT_FOUND: 4404,
    }

    def frame(self, envelope: Envelope) -> bytes | None:
        return envelope.payload

    def control(self, frame: JSON) -> bytes:
        return orjson.dumps(frame)

    def close_code(self, reason: CloseReason) -> int:
        return self.CLOSE_CODES[reason]


NATIVE = NativeCodec()
