"""`/ws` across two real instances on one Redis and one PostgreSQL.

Bob's one socket is on instance a; everything he follows happens on instance b: messages
from concurrent senders (REST and `/ws/{session_id}`), his own events, his removal. Then
he reconnects to b with `since_seq` per session. Every session's seqs arrive complete,
in order, without duplicates.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from chatservice.auth import TokenCodec
from tests.conftest import ServerProcess, new_user
from tests.e2e.conftest import bearer, recv_json, recv_until
from tests.e2e.scaleout_helpers import Cluster, start_cluster, unhandled_errors

JSON = dict[str, Any]
API = "/api/chat"
PER_SENDER = 15


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, postgres_url: str) -> Iterator[Cluster]:
    made = start_cluster(tmp_path_factory.mktemp("mux-scaleout"), postgres_url)
    yield made
    made.stop()


async def mux(server: ServerProcess, token: str) -> ClientConnection:
    ws = await websockets.connect(f"{server.ws_url}/ws?token={token}", max_queue=4096)
    assert (await recv_json(ws))["type"] == "connected"
    return ws


async def subscribe(ws: ClientConnection, sid: str, since_seq: int | None = None) -> JSON:
    frame: JSON = {"type": "subscribe", "session_id": sid}
    if since_seq is not None:
        frame["since_seq"] = since_seq
    await ws.send(json.dumps(frame))
    return await recv_until(ws, "subscribed", timeout=10)


async def collect(
    ws: ClientConnection, until: dict[str, int], seen: dict[str, list[int]]
) -> list[JSON]:
    """Read until every session in `until` reached its seq; returns the other frames."""
    others: list[JSON] = []
    while any((seen.get(s) or [0])[-1] < last for s, last in until.items()):
        frame = await recv_json(ws, timeout=15)
        if frame["type"] == "message":
            seen.setdefault(frame["session_id"], []).append(frame["seq"])
        else:
            others.append(frame)
    return others


async def test_one_socket_on_a_follows_sessions_written_on_b(
    cluster: Cluster, tokens: TokenCodec
) -> None:
    alice, bob, carol = new_user("alice"), new_user("bob"), new_user("carol")
    on_b = {
        who: httpx.AsyncClient(
            base_url=cluster.b.base_url, headers=bearer(tokens.issue(who)), timeout=10
        )
        for who in (alice, carol)
    }
    ws = await mux(cluster.a, tokens.issue(bob))
    try:
        sessions = []
        for _ in range(2):
            made = await on_b[alice].post(
                f"{API}/sessions", json={"kind": "group", "participants": [bob, carol]}
            )
            assert made.status_code == 201, made.text
            sessions.append(made.json()["session_id"])
        first, second = sessions
        # Bob's own events, published on b, reach his socket on a.
        for sid in sessions:
            change = await recv_until(ws, "session_changed", timeout=10)
            assert (change["session_id"], change["change"]) == (sid, "created")
        for sid in sessions:
            assert (await subscribe(ws, sid))["last_seq"] == 0

        async def rest_sender(who: str, sid: str) -> None:
            for i in range(PER_SENDER):
                sent = await on_b[who].post(
                    f"{API}/sessions/{sid}/messages", json={"content": f"{who} {i}"}
                )
                assert sent.status_code == 201, sent.text

        async def ws_sender(sid: str) -> None:
            url = f"{cluster.b.ws_url}/ws/{sid}?token={tokens.issue(carol)}"
            async with websockets.connect(url, max_queue=4096) as single:
                await recv_until(single, "connected")
                for i in range(PER_SENDER):
                    await single.send(json.dumps({"type": "message", "content": f"ws {i}"}))
                await asyncio.sleep(0.5)

        await asyncio.gather(
            rest_sender(alice, first),
            rest_sender(carol, first),
            ws_sender(first),
            rest_sender(alice, second),
        )
        seen: dict[str, list[int]] = {}
        await collect(ws, {first: 3 * PER_SENDER, second: PER_SENDER}, seen)
        assert seen[first] == list(range(1, 3 * PER_SENDER + 1))
        assert seen[second] == list(range(1, PER_SENDER + 1))

        # Removed on b: the subscription on a ends with a frame, the socket stays open.
        removed = await on_b[alice].delete(f"{API}/sessions/{second}/participants/{bob}")
        assert removed.status_code in (200, 204), removed.text
        lost = await recv_until(ws, "unsubscribed", timeout=10)
        assert (lost["session_id"], lost["reason"]) == (second, "forbidden")
    finally:
        await ws.close()

    # Back on b, from where he was in each session he still follows; more was said meanwhile.
    for i in range(3):
        sent = await on_b[alice].post(f"{API}/sessions/{first}/messages", json={"content": f"{i}"})
        assert sent.status_code == 201
    again = await mux(cluster.b, tokens.issue(bob))
    try:
        got = await subscribe(again, first, since_seq=seen[first][-1])
        assert got["last_seq"] == 3 * PER_SENDER + 3
        more: dict[str, list[int]] = {}
        await collect(again, {first: 3 * PER_SENDER + 3}, more)
        assert more[first] == [3 * PER_SENDER + 1, 3 * PER_SENDER + 2, 3 * PER_SENDER + 3]
        await again.send(json.dumps({"type": "subscribe", "session_id": second}))
        refused = await recv_until(again, "error", timeout=10)
        assert (refused["code"], refused["session_id"]) == ("FORBIDDEN", second)
    finally:
        await again.close()
        for client in on_b.values():
            await client.aclose()
    assert not unhandled_errors(cluster.logs()), cluster.logs()
