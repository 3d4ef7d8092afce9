"""The hub: this instance's connections, grouped by session, fed from the bus.

One bus subscription per session with local connections, whatever their number; each
event is decoded once per session to read its header and the same text goes to every
connection. Persisted messages are released in `seq` order even when publishes arrive
out of order (two writers commit 5 then 6 but publish 6 then 5): a gap waits briefly and
is then filled from the database, so a lost publish can delay a message but never lose it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

import orjson

from chatservice import events
from chatservice.bus.base import Bus, Presence, PresenceEntry
from chatservice.domain import isoformat, utcnow
from chatservice.realtime.connection import CLOSE_FORBIDDEN, CLOSE_NOT_FOUND, Connection

log = logging.getLogger(__name__)


class History(Protocol):
    """What the hub needs from the message service to close gaps."""

    async def last_seq(self, session_id: str) -> int: ...

    async def frames_after(
        self, session_id: str, after: int, limit: int
    ) -> list[tuple[int, str]]: ...


class Room:
    """One session's local connections and its seq sequencer."""

    def __init__(self, hub: Hub, session_id: str) -> None:
        self.hub = hub
        self.session_id = session_id
        self.channels = events.session_channels(session_id)
        self.connections: set[Connection] = set()
        self.refs = 0  # connections attached or attaching
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.released: int | None = None  # highest seq handed to connections
        self._waiting: dict[int, tuple[str, str | None]] = {}
        self._gap_task: asyncio.Task[None] | None = None

    # -- bus side -------------------------------------------------------------------------

    def on_bus(self, _channel: str, data: bytes) -> None:
        try:
            head = orjson.loads(data)
            text = data.decode()
        except (orjson.JSONDecodeError, UnicodeDecodeError):
            log.warning("dropping undecodable event on %s", self.session_id)
            return
        kind = head.get("type")
        seq = head.get("seq")
        stream_id = head.get("message_id") if kind in events.STREAM_TYPES else None
        if kind in events.SEQUENCED_TYPES and isinstance(seq, int):
            self._sequence(seq, text, stream_id)
            return
        # A stream's start counts as chunk -1, so a resumed client never gets it twice.
        index = (
            head.get("index") if kind == "stream_chunk" else -1 if kind == "stream_start" else None
        )
        # A typer does not see their own typing indicator, on any of their devices.
        skip_user = head.get("user_id") if kind == "typing" else None
        for conn in tuple(self.connections):
            if conn.user_id != skip_user:
                conn.offer(None, text, stream_id, index)
        if kind == "system":
            self._enforce_access(head)

    def _enforce_access(self, head: dict[str, object]) -> None:
        """Connections that lost access by this event close once it has reached them."""
        name = head.get("event")
        if name == "session_deleted":
            for conn in tuple(self.connections):
                conn.finish(CLOSE_NOT_FOUND, "session deleted")
        elif name == "participant_removed":
            for conn in tuple(self.connections):
                if conn.user_id == head.get("user_id"):
                    conn.finish(CLOSE_FORBIDDEN, "removed from the session")

    def _sequence(self, seq: int, text: str, stream_id: str | None = None) -> None:
        if self.released is None:  # still learning where the session stands
            self._waiting[seq] = (text, stream_id)
            return
        if seq <= self.released:
            return
        self._waiting[seq] = (text, stream_id)
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
            text, stream_id = waiting.pop(nxt)
            self.released = nxt
            for conn in tuple(self.connections):
                conn.offer(nxt, text, stream_id)

    async def _fill_gap(self) -> None:
        try:
            while self._waiting:
                await asyncio.sleep(self.hub.gap_timeout)
                if not self._waiting or self.released is None:
                    continue
                first = min(self._waiting)
                if first > self.released + 1:
                    try:
                        frames = await self.hub.history.frames_after(
                            self.session_id, self.released, first - self.released - 1
                        )
                    except Exception:
                        log.warning(
                            "filling a seq gap in %s failed", self.session_id, exc_info=True
                        )
                        continue
                    for seq, text in frames:
                        if self.released < seq < first:
                            self._waiting.setdefault(seq, (text, None))
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
            frames = await self.hub.history.frames_after(self.session_id, after, 500)
            for seq, text in frames:
                self._sequence(seq, text)
            if len(frames) < 500:
                return
            after = frames[-1][0]

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
        *,
        gap_timeout: float = 0.5,
        heartbeat_interval: float = 30.0,
    ) -> None:
        self.bus = bus
        self.history = history
        self.presence = presence
        self.gap_timeout = gap_timeout
        self.heartbeat_interval = heartbeat_interval
        self._rooms: dict[str, Room] = {}
        self._heartbeats: asyncio.Task[None] | None = None
        self.connection_count = 0
        bus.on_reconnect(self.resync)

    async def start(self) -> None:
        self._heartbeats = asyncio.create_task(self._beat_forever(), name="presence-heartbeat")

    async def stop(self) -> None:
        if self._heartbeats is not None:
            self._heartbeats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeats

    async def attach(self, conn: Connection) -> Room:
        """Add a connection; it receives live events once `conn.go_live()` is called."""
        room = self._rooms.get(conn.session_id)
        if room is None:
            room = Room(self, conn.session_id)
            self._rooms[conn.session_id] = room
            room.refs += 1
            try:
                await room.start()
            except BaseException as exc:
                self._rooms.pop(conn.session_id, None)
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
        conn.last_seq = room.released
        room.connections.add(conn)
        self.connection_count += 1
        try:
            first = conn.presence and await self.presence.join(_entry(conn))
        except Exception as exc:  # presence is best effort; the connection itself is fine
            log.warning("presence join failed for %s: %s", conn.session_id, exc)
            first = False
        if first:
            await self._announce(conn.session_id, "user_joined", conn.user_id)
        return room

    async def detach(self, conn: Connection) -> None:
        room = self._rooms.get(conn.session_id)
        if room is None or conn not in room.connections:
            return
        room.connections.discard(conn)
        self.connection_count -= 1
        room.refs -= 1
        try:
            last = conn.presence and await self.presence.leave(_entry(conn))
        except Exception as exc:
            log.warning("presence leave failed for %s: %s", conn.session_id, exc)
            last = False
        if last:
            await self._announce(conn.session_id, "user_left", conn.user_id)
        if room.refs == 0 and self._rooms.get(conn.session_id) is room:
            del self._rooms[conn.session_id]
            await room.stop()

    def room(self, session_id: str) -> Room | None:
        return self._rooms.get(session_id)

    async def resync(self) -> None:
        """After the bus link was down: fetch what every room may have missed."""
        for room in list(self._rooms.values()):
            try:
                await room.catch_up()
            except Exception:
                log.exception("catching up %s failed", room.session_id)

    async def settle(self, quiet: float = 0.1, timeout: float = 2.0) -> None:
        """Until every connection's queue is written and no new frame came for `quiet`
        seconds (events published just before may still be on the bus), or `timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            pending = [
                conn
                for room in self._rooms.values()
                for conn in room.connections
                if not conn.closed and conn.backlog
            ]
            if not pending:
                await asyncio.sleep(quiet)
                if not any(
                    conn.backlog for room in self._rooms.values() for conn in room.connections
                ):
                    return
            else:
                await asyncio.sleep(0.02)

    async def close_all(self, code: int, reason: str) -> None:
        for room in list(self._rooms.values()):
            for conn in list(room.connections):
                conn.kill(code, reason)

    async def heartbeat(self) -> None:
        """Keep this instance's connections present; expire a crashed instance's."""
        entries = [
            _entry(c) for room in self._rooms.values() for c in room.connections if c.presence
        ]
        await self.presence.refresh(entries)
        for session_id, user_id in await self.presence.sweep():
            await self._announce(session_id, "user_left", user_id)

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            try:
                await self.heartbeat()
            except Exception as exc:
                log.warning("presence heartbeat failed: %s", exc)

    async def _announce(self, session_id: str, name: str, user_id: str) -> None:
        event = events.system_event(session_id, name, user_id, isoformat(utcnow()))
        await self.bus.publish(events.presence_channel(session_id), events.encode(event))


def _entry(conn: Connection) -> PresenceEntry:
    return PresenceEntry(conn.session_id, conn.user_id, conn.conn_id)
