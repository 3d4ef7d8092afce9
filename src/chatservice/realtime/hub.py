"""The hub: this instance's connections and their subscriptions, fed from the bus.

Subscriptions are indexed by session (a `Room` each) and connections by user. A room
holds one bus subscription for its session whatever the number of local subscribers; a
user with multiplexed connections here has one on their user channel. Each event's
envelope header is decoded once per instance, and each codec encodes it once.

Persisted messages are released in `seq` order even when publishes arrive out of order
(two writers commit 5 then 6 but publish 6 then 5): a gap waits briefly and is then
filled from the database, so a lost publish can delay a message but never lose it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Protocol

from chatservice import events
from chatservice.bus.base import ANYWHERE, Bus, Presence, PresenceEntry
from chatservice.domain import isoformat, utcnow
from chatservice.envelope import SEQUENCED_TYPES, BadEnvelope, Envelope
from chatservice.publisher import Publisher
from chatservice.realtime.codec import CloseReason
from chatservice.realtime.connection import Connection, Subscription

log = logging.getLogger(__name__)

# How often the watchdog looks: a stalled client is closed at most this long after its
# write timeout, an expired token's connection at most this long after `exp`.
CHECK_SECONDS = 0.5


class History(Protocol):
    """What the hub reads from the database to close gaps (`store/history.py`)."""

    async def last_seq(self, session_id: str) -> int: ...

    async def after(self, session_id: str, after: int, limit: int) -> list[Envelope]: ...


def _decode(data: bytes, where: str) -> Envelope | None:
    try:
        return Envelope.decode(data)
    except BadEnvelope:
        log.warning("dropping an undecodable event on %s", where)
        return None


class Room:
    """One session's local subscriptions and its seq sequencer."""

    def __init__(self, hub: Hub, session_id: str) -> None:
        self.hub = hub
        self.session_id = session_id
        self.channels = events.session_channels(session_id)
        self.subscriptions: set[Subscription] = set()
        self.refs = 0  # subscriptions attached or attaching
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.released: int | None = None  # highest seq handed to subscriptions
        self._waiting: dict[int, Envelope] = {}
        self._gap_task: asyncio.Task[None] | None = None

    # -- bus side -------------------------------------------------------------------------

    def on_bus(self, _channel: str, data: bytes) -> None:
        envelope = _decode(data, self.session_id)
        if envelope is None:
            return
        if envelope.seq is not None and envelope.kind in SEQUENCED_TYPES:
            self._sequence(envelope)
            return
        # A typer does not see their own typing indicator, on any of their devices.
        skip_user = envelope.actor if envelope.kind == "typing" else None
        for sub in tuple(self.subscriptions):
            if sub.conn.user_id != skip_user:
                sub.offer(envelope)
        if envelope.kind == "system":
            self._enforce_access(envelope)

    def _enforce_access(self, envelope: Envelope) -> None:
        """Subscribers that lost access by this event lose the subscription once it has
        reached them (a single-session socket closes)."""
        name = envelope.event.get("event")
        if name == "session_deleted":
            for sub in tuple(self.subscriptions):
                self.hub.revoke(sub, CloseReason.NOT_FOUND, "session deleted")
        elif name == "participant_removed":
            for sub in tuple(self.subscriptions):
                if sub.conn.user_id == envelope.actor:
                    self.hub.revoke(sub, CloseReason.FORBIDDEN, "removed from the session")

    def _sequence(self, envelope: Envelope) -> None:
        seq = envelope.seq
        assert seq is not None
        if self.released is None:  # still learning where the session stands
            self._waiting[seq] = envelope
            return
        if seq <= self.released:
            return
        self._waiting[seq] = envelope
        self._drain()

    def _drain(self) -> None:
        self._release_contiguous()
        if self._waiting and self._gap_task is None:
            self._gap_task = asyncio.create_task(self._fill_gap())

    def _release_contiguous(self) -> None:
        assert self.released is not None
        waiting = self._waiting
        for stale in [s for s in waiting if s <= self.released]:
            del waiting[stale]
        while (nxt := self.released + 1) in waiting:
            envelope = waiting.pop(nxt)
            self.released = nxt
            for sub in tuple(self.subscriptions):
                sub.offer(envelope)

    async def _fill_gap(self) -> None:
        try:
            while self._waiting:
                await asyncio.sleep(self.hub.gap_timeout)
                if not self._waiting or self.released is None:
                    continue
                first = min(self._waiting)
                if first > self.released + 1:
                    try:
                        found = await self.hub.history.after(
                            self.session_id, self.released, first - self.released - 1
                        )
                    except Exception:
                        log.warning(
                            "filling a seq gap in %s failed", self.session_id, exc_info=True
                        )
                        continue
                    for envelope in found:
                        seq = envelope.seq
                        if seq is not None and self.released < seq < first:
                            self._waiting.setdefault(seq, envelope)
                    # Live frames or a resync may have moved things on during the fetch.
                    if not self._waiting or min(self._waiting) <= self.released + 1:
                        self._release_contiguous()
                        continue
                    # What is still missing in the window just fetched is not in the
                    # database (a deleted message): skip it rather than wait forever.
                    # (A gap beyond `first` opened meanwhile gets its own fetch.)
                    if min(self._waiting) <= first:
                        self.released = min(self._waiting) - 1
                self._release_contiguous()
        finally:
            self._gap_task = None

    async def catch_up(self) -> None:
        """Feed the sequencer everything the database has after what was released."""
        if self.released is None:
            return
        after = self.released
        while True:
            found = await self.hub.history.after(self.session_id, after, 500)
            for envelope in found:
                self._sequence(envelope)
            if len(found) < 500:
                return
            after = found[-1].seq or after

    async def start(self) -> None:
        await self.hub.bus.subscribe(self.channels, self.on_bus)
        self.released = await self.hub.history.last_seq(self.session_id)
        self._drain()

    async def stop(self) -> None:
        if self._gap_task is not None:
            self._gap_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._gap_task
        await self.hub.bus.unsubscribe(self.channels, self.on_bus)


class Hub:
    def __init__(
        self,
        bus: Bus,
        history: History,
        presence: Presence,
        publisher: Publisher,
        *,
        gap_timeout: float = 0.5,
        heartbeat_interval: float = 30.0,
    ) -> None:
        self.bus = bus
        self.history = history
        self.presence = presence
        self.publisher = publisher
        self.gap_timeout = gap_timeout
        self.heartbeat_interval = heartbeat_interval
        self._rooms: dict[str, Room] = {}
        self._users: dict[str, set[Connection]] = {}
        self._user_channels: dict[str, asyncio.Future[None]] = {}  # users followed here
        self._heartbeats: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._revoking: set[asyncio.Task[None]] = set()
        self.connection_count = 0
        bus.on_reconnect(self.resync)

    async def start(self) -> None:
        self._heartbeats = asyncio.create_task(self._beat_forever(), name="presence-heartbeat")
        self._watchdog = asyncio.create_task(self._watch(), name="connection-watchdog")

    async def stop(self) -> None:
        for task in (self._heartbeats, self._watchdog):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    # -- connections ----------------------------------------------------------------------

    async def connect(self, conn: Connection) -> None:
        """Count a connection and index it by user; a multiplexed one also receives the
        user's own events, and is the user being online even with no subscription."""
        self._users.setdefault(conn.user_id, set()).add(conn)
        self.connection_count += 1
        if conn.multiplexed:
            await self._follow_user(conn.user_id)
            if conn.presence:
                await self._presence_join(PresenceEntry(ANYWHERE, conn.user_id, conn.conn_id))

    async def disconnect(self, conn: Connection) -> None:
        """Undo `connect` and every subscription the connection still has."""
        for sub in list(conn.subscriptions.values()):
            await self.unsubscribe(sub)
        users = self._users.get(conn.user_id)
        if users is None or conn not in users:
            return
        users.discard(conn)
        self.connection_count -= 1
        if not users:
            del self._users[conn.user_id]
        if conn.multiplexed:
            if conn.presence:
                await self._presence_leave(PresenceEntry(ANYWHERE, conn.user_id, conn.conn_id))
            if not any(c.multiplexed for c in self._users.get(conn.user_id, ())):
                await self._unfollow_user(conn.user_id)

    def connections_of(self, user_id: str) -> frozenset[Connection]:
        return frozenset(self._users.get(user_id, ()))

    # -- subscriptions --------------------------------------------------------------------

    async def subscribe(self, conn: Connection, session_id: str) -> Subscription:
        """Follow a session; events are held back until `Subscription.go_live`."""
        existing = conn.subscriptions.get(session_id)
        if existing is not None:
            return existing
        room = self._rooms.get(session_id)
        if room is None:
            room = Room(self, session_id)
            self._rooms[session_id] = room
            room.refs += 1
            try:
                await room.start()
            except BaseException as exc:
                self._rooms.pop(session_id, None)
                room.ready.set_exception(exc)
                room.ready.exception()  # mark retrieved for waiters that never come
                raise
            room.ready.set_result(None)
        else:
            room.refs += 1
            try:
                await asyncio.shield(room.ready)
            except BaseException:
                room.refs -= 1
                raise
        assert room.released is not None
        sub = Subscription(conn, session_id)
        sub.last_seq = room.released
        room.subscriptions.add(sub)
        conn.subscriptions[session_id] = sub
        if conn.presence and await self._presence_join(_entry(sub)):
            await self._announce(session_id, "user_joined", conn.user_id)
        return sub

    async def unsubscribe(self, sub: Subscription) -> None:
        sub.active = False
        conn = sub.conn
        if conn.subscriptions.get(sub.session_id) is sub:
            del conn.subscriptions[sub.session_id]
        room = self._rooms.get(sub.session_id)
        if room is None or sub not in room.subscriptions:
            return
        room.subscriptions.discard(sub)
        room.refs -= 1
        if conn.presence and await self._presence_leave(_entry(sub)):
            await self._announce(sub.session_id, "user_left", conn.user_id)
        if room.refs == 0 and self._rooms.get(sub.session_id) is room:
            del self._rooms[sub.session_id]
            await room.stop()

    def revoke(self, sub: Subscription, reason: CloseReason, detail: str) -> None:
        """A subscriber lost access. A single-session socket closes once the frames
        before are written; a multiplexed one is told, and stays open."""
        conn = sub.conn
        if not conn.multiplexed:
            conn.finish(reason, detail)
            return
        if not sub.active:
            return
        sub.active = False
        conn.send_control(
            {
                "type": "unsubscribed",
                "session_id": sub.session_id,
                "reason": reason.value,
                "message": detail,
            }
        )
        task = asyncio.create_task(self.unsubscribe(sub))
        self._revoking.add(task)
        task.add_done_callback(self._revoking.discard)

    def room(self, session_id: str) -> Room | None:
        return self._rooms.get(session_id)

    # -- the user channel -----------------------------------------------------------------

    def _on_user_event(self, _channel: str, data: bytes) -> None:
        envelope = _decode(data, "a user channel")
        if envelope is None or envelope.user_id is None:
            return
        for conn in tuple(self._users.get(envelope.user_id, ())):
            if conn.multiplexed:
                conn.push(envelope)

    async def _follow_user(self, user_id: str) -> None:
        following = self._user_channels.get(user_id)
        if following is None:
            following = asyncio.get_running_loop().create_future()
            self._user_channels[user_id] = following
            try:
                await self.bus.subscribe([events.user_channel(user_id)], self._on_user_event)
            except BaseException as exc:
                del self._user_channels[user_id]
                following.set_exception(exc)
                following.exception()
                raise
            following.set_result(None)
        else:
            await asyncio.shield(following)

    async def _unfollow_user(self, user_id: str) -> None:
        if self._user_channels.pop(user_id, None) is not None:
            await self.bus.unsubscribe([events.user_channel(user_id)], self._on_user_event)

    # -- instance-wide --------------------------------------------------------------------

    async def resync(self) -> None:
        """After the bus link was down: fetch what every room may have missed."""
        for room in list(self._rooms.values()):
            try:
                await room.catch_up()
            except Exception:
                log.exception("catching up %s failed", room.session_id)

    def _connections(self) -> list[Connection]:
        return [conn for conns in self._users.values() for conn in conns]

    async def settle(self, quiet: float = 0.1, timeout: float = 2.0) -> None:
        """Until every connection's queue is written and no new frame came for `quiet`
        seconds (events published just before may still be on the bus), or `timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if not any(c.backlog for c in self._connections() if not c.closed):
                await asyncio.sleep(quiet)
                if not any(c.backlog for c in self._connections()):
                    return
            else:
                await asyncio.sleep(0.02)

    async def close_all(self, reason: CloseReason, detail: str) -> None:
        for conn in self._connections():
            conn.kill(reason, detail)

    async def heartbeat(self) -> None:
        """Keep this instance's connections present; expire a crashed instance's."""
        entries = [
            _entry(sub)
            for room in self._rooms.values()
            for sub in room.subscriptions
            if sub.conn.presence
        ]
        entries += [
            PresenceEntry(ANYWHERE, c.user_id, c.conn_id)
            for c in self._connections()
            if c.multiplexed and c.presence
        ]
        await self.presence.refresh(entries)
        for session_id, user_id in await self.presence.sweep():
            if session_id != ANYWHERE:
                await self._announce(session_id, "user_left", user_id)

    async def _watch(self) -> None:
        """Every `CHECK_SECONDS`, close connections whose socket has been paused for longer
        than their write timeout, or whose token expired: one pass over the connections
        instead of a timer per frame and one per connection."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(CHECK_SECONDS)
            now, wall = loop.time(), time.time()
            for conn in self._connections():
                conn.check(now, wall)

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            try:
                await self.heartbeat()
            except Exception as exc:
                log.warning("presence heartbeat failed: %s", exc)

    async def _presence_join(self, entry: PresenceEntry) -> bool:
        try:
            return await self.presence.join(entry)
        except Exception as exc:  # presence is best effort; the connection itself is fine
            log.warning("presence join failed for %s: %s", entry.session_id, exc)
            return False

    async def _presence_leave(self, entry: PresenceEntry) -> bool:
        try:
            return await self.presence.leave(entry)
        except Exception as exc:
            log.warning("presence leave failed for %s: %s", entry.session_id, exc)
            return False

    async def _announce(self, session_id: str, name: str, user_id: str) -> None:
        await self.publisher.publish(
            events.system_event(session_id, name, user_id, isoformat(utcnow()))
        )


def _entry(sub: Subscription) -> PresenceEntry:
    # One entry per subscription: a multiplexed connection is present in each session
    # it follows, under its own id in each.
    conn = sub.conn
    conn_id = conn.conn_id if not conn.multiplexed else f"{conn.conn_id}/{sub.session_id}"
    return PresenceEntry(sub.session_id, conn.user_id, conn_id)
