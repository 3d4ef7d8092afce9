"""The one way an event leaves a service for the clients: `Publisher.publish`.

Every event a client can receive — a user's message over any transport, an agent's
answer, receipts, typing, membership and session changes, a user's own notices — goes
out here, wrapped in its envelope and sent to its channel on the bus. This is the seam
where an outbox, metrics and tracing attach; services never call `Bus.publish` for a
client's event themselves.
"""

from __future__ import annotations

from chatservice import events
from chatservice.bus.base import Bus
from chatservice.domain import JSON
from chatservice.envelope import Envelope

# Presence announcements have a channel of their own: hubs of every instance make them.
PRESENCE_EVENTS = frozenset({"user_joined", "user_left"})


def channel_of(envelope: Envelope) -> str:
    """Where an envelope travels: its user's channel, or one of its session's."""
    if envelope.user_id is not None:
        return events.user_channel(envelope.user_id)
    session_id = envelope.session_id or ""
    if envelope.kind == "typing":
        return events.typing_channel(session_id)
    if envelope.kind == "system" and envelope.event.get("event") in PRESENCE_EVENTS:
        return events.presence_channel(session_id)
    return events.session_channel(session_id)


class Publisher:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    async def publish(self, event: JSON, *, to_user: str | None = None) -> Envelope:
        """Send a native event to everyone following its session, or (`to_user`) to
        every connection of that user, on every instance."""
        envelope = Envelope.of(event, user_id=to_user)
        await self.bus.publish(channel_of(envelope), envelope.encode())
        return envelope
