"""A client that stops reading is disconnected (close 4008) without slowing the room.

How the slow client stops reading: it is a plain `websockets` client that never calls
recv() while the room is busy, and three things make sure the server actually feels it
(otherwise the kernel and the library would quietly buffer megabytes for it):
  * `max_queue=1`: websockets stops reading from the socket as soon as one frame waits
    unread in its own buffer (flow control), so nothing more is taken off the socket;
  * the socket is created by hand with SO_RCVBUF=4096 before connecting, so the kernel's
    receive window stays tiny and TCP back-pressure reaches the server quickly;
  * `compression=None` and random (incompressible) message bodies, so permessage-deflate
    cannot shrink ~60 KB messages to a few bytes on the wire.
The server's writer for that connection then blocks in send, its bounded queue
(WS_SEND_QUEUE_SIZE=8) fills, and the hub closes the connection with 4008. The client
only learns the close code when it finally reads: the frames already in flight, then the
close frame.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from chatservice.auth import TokenCodec
from chatservice.client import ChatClient, RealtimeConnection
from tests.conftest import ServerProcess, new_user, start_server
from tests.e2e.conftest import frames_until_pong, ws_url

QUEUE_SIZE = 8
BIG = 30_000  # random bytes per message, sent as 60,000 hex characters


def _flood_count() -> int:
    """Messages needed to overflow what the kernel may buffer for a stalled reader.

    The server's socket send buffer grows up to tcp_wmem's maximum (4 MiB by default);
    send at least twice that, and never fewer than 120 messages (~7 MB).
    """
    try:
        wmem_max = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, ValueError, IndexError):
        wmem_max = 4 * 1024 * 1024
    return max(120, 2 * wmem_max // (2 * BIG) + 4 * QUEUE_SIZE)


FLOOD = _flood_count()


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = start_server(tmp_path_factory.mktemp("server-slow"), WS_SEND_QUEUE_SIZE=QUEUE_SIZE)
    yield proc
    proc.stop()


async def connect_non_reader(server: ServerProcess, url: str) -> ClientConnection:
    """A websockets client that takes (almost) nothing off the socket unless asked."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
    return await connect(url, sock=sock, max_queue=1, compression=None, max_size=None)


async def drain_until_closed(ws: ClientConnection) -> tuple[list[dict[str, Any]], int | None, str]:
    """Read what the server sent before closing, then return it with the close code."""
    frames: list[dict[str, Any]] = []
    try:
        while True:
            frames.append(json.loads(await asyncio.wait_for(ws.recv(), 15)))
    except ConnectionClosed as exc:
        rcvd = exc.rcvd
        return frames, (rcvd.code if rcvd else None), (rcvd.reason if rcvd else "")


class Reader:
    """A well-behaved client: reads every frame as it comes, in a task."""

    def __init__(self, live: RealtimeConnection) -> None:
        self.live = live
        self.seqs: list[int] = []
        self.presence: list[tuple[str, str]] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for frame in self.live:
            if frame["type"] == "message":
                self.seqs.append(frame["seq"])
            elif frame["type"] == "system":
                self.presence.append((frame["event"], frame["user_id"]))

    async def wait_presence(self, event: str, user_id: str, timeout: float = 5) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (event, user_id) not in self.presence:
            assert loop.time() < deadline, f"no {event} for {user_id}: {self.presence}"
            await asyncio.sleep(0.02)

    async def wait_for(self, seq: int, timeout: float = 30) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.seqs or self.seqs[-1] < seq:
            assert not self.task.done(), "the reader's connection ended"
            assert loop.time() < deadline, f"reader stuck at {self.seqs[-1:]} waiting for {seq}"
            await asyncio.sleep(0.02)


async def send_big(live: RealtimeConnection, count: int) -> None:
    """Send `count` large messages, each after the previous one's echo."""
    for _ in range(count):
        cid = await live.send_message(os.urandom(BIG).hex())
        while True:
            frame = await live.receive(15)
            assert frame["type"] != "error", frame
            if frame["type"] == "message" and frame["client_msg_id"] == cid:
                break


async def test_client_that_stops_reading_is_closed_with_4008(
    slow_server: ServerProcess, tokens: TokenCodec
) -> None:
    alice, bob, slow = new_user("alice"), new_user("bob"), new_user("slow")
    total = FLOOD + 20
    async with (
        ChatClient(slow_server.base_url, tokens.issue(alice)) as a,
        ChatClient(slow_server.base_url, tokens.issue(bob)) as b,
    ):
        sid = (await a.create_session(title="busy", participants=[bob, slow]))["session_id"]
        hog = await connect_non_reader(slow_server, ws_url(slow_server, sid, tokens.issue(slow)))
        await frames_until_pong(hog)  # it is attached and live; from now on it never reads
        async with a.realtime(sid) as sender, b.realtime(sid) as watcher:
            await watcher.ping()
            await watcher.receive_until("pong")  # attached: it will see every message
            reader = Reader(watcher)
            await asyncio.wait_for(send_big(sender, total), 60)
            # The good client got every message, in order, while the hog sat there.
            await reader.wait_for(total)
            assert reader.seqs == list(range(1, total + 1))

            # Now the hog finally reads: what was in flight, then the 4008 close.
            frames, code, reason = await drain_until_closed(hog)
            assert code == 4008, (code, reason, len(frames))
            assert "since_seq" in reason
            seqs = [f["seq"] for f in frames if f.get("type") == "message"]
            assert seqs == list(range(1, len(seqs) + 1))  # a clean prefix, no gap
            assert len(seqs) < total  # it really was cut off
            # The server let go of it: the others see the hog leave.
            await reader.wait_presence("user_left", slow)

            # It recovers everything it missed with since_seq, on a normal connection.
            async with RealtimeConnection(
                slow_server.base_url, sid, tokens.issue(slow), since_seq=seqs[-1] if seqs else 0
            ) as again:
                missed = []
                while len(missed) < total - len(seqs):
                    frame = await again.receive(15)
                    if frame["type"] == "message":
                        missed.append(frame["seq"])
                assert missed == list(range(len(seqs) + 1, total + 1))

            # The room is still fine after the hog was dropped.
            await sender.send_message("after the hog", client_msg_id="after")
            await reader.wait_for(total + 1)
            assert reader.seqs[-1] == total + 1
            await sender.receive_until("message")
        reader.task.cancel()


async def test_client_stalled_during_since_seq_replay_is_closed_with_4008(
    slow_server: ServerProcess, tokens: TokenCodec
) -> None:
    """A reconnecting client that stops reading mid-replay is dropped once live messages
    pile up behind the replay, and the others keep receiving."""
    alice, bob, slow = new_user("alice"), new_user("bob"), new_user("slow")
    async with (
        ChatClient(slow_server.base_url, tokens.issue(alice)) as a,
        ChatClient(slow_server.base_url, tokens.issue(bob)) as b,
    ):
        sid = (await a.create_session(title="history", participants=[bob, slow]))["session_id"]
        async with a.realtime(sid) as sender:
            await send_big(sender, FLOOD)  # more history than the pipe holds
            hog = await connect_non_reader(
                slow_server, ws_url(slow_server, sid, tokens.issue(slow), since_seq=0)
            )
            async with b.realtime(sid) as watcher:
                await watcher.ping()
                await watcher.receive_until("pong")
                reader = Reader(watcher)
                await asyncio.sleep(0.5)  # the replay has filled the pipe by now
                for i in range(QUEUE_SIZE * 3):
                    await a.send_message(sid, f"live {i}")
                last = FLOOD + QUEUE_SIZE * 3
                await reader.wait_for(last)
                assert reader.seqs == list(range(FLOOD + 1, last + 1))
                frames, code, reason = await drain_until_closed(hog)
                assert code == 4008, (code, reason, len(frames))
                seqs = [f["seq"] for f in frames if f.get("type") == "message"]
                assert seqs == list(range(1, len(seqs) + 1))
                assert len(seqs) < last
                # The server lets go of it. A handler waiting in the replay gives up after
                # REPLAY_STALL_SECONDS (10 s, realtime/connection.py), hence the long wait.
                await reader.wait_presence("user_left", slow, timeout=20)
                reader.task.cancel()
            while sender.last_seq < last:  # read our echoes so the close is clean
                await sender.receive(15)
