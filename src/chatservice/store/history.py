"""A session's stored messages as the realtime side reads them: envelopes after a seq.

The hub closes gaps with it and a `since_seq` replay reads from it; both get the same
envelopes the live path carries, so a replayed message and a live one are the same
frame to every codec.
"""

from __future__ import annotations

from chatservice import events
from chatservice.envelope import Envelope
from chatservice.store.messages import MessageStore


class MessageHistory:
    def __init__(self, store: MessageStore) -> None:
        self.store = store

    async def last_seq(self, session_id: str) -> int:
        return await self.store.last_seq(session_id)

    async def after(self, session_id: str, after: int, limit: int) -> list[Envelope]:
        """Up to `limit` visible messages with seq > `after`, in seq order."""
        messages = await self.store.after_seq(session_id, after, limit)
        return [Envelope.of(events.message_event(m)) for m in messages]
