"""Failures lose nothing: Redis dies and comes back (busy or idle), an instance is SIGKILLed,
an instance restarts, a client is cut for reading too slowly, Redis is missing at start-up.

Each test has its own Redis and instances (they get killed); all share the run's
PostgreSQL database. The SDK connections here repair themselves (reconnect with backoff
and `since_seq`), and every one of them must end with exactly the stored history.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import websockets
from redis.asyncio import Redis

from chatservice.auth import TokenCodec
from chatservice.client import ChatAPIError, RealtimeConnection
from tests.conftest import TEST_SECRET, free_port
from tests.e2e.conftest import close_code, frames_until_pong
from tests.e2e.scaleout_helpers import (
    SWEEP_EVERY,
    TIMEOUT,
    Cluster,
    People,
    Person,
    Recorder,
    assert_complete,
    eventually,
    numsub,
    restart_on_same_port,
    start_cluster,
    stop_all,
    unhandled_errors,
    wait_all,
    ws_address,
)

# Slack for scheduling and delivery on top of the presence timings under test.
SLACK = 1.0


@pytest.fixture
def cluster(tmp_path: Path, postgres_url: str) -> Iterator[Cluster]:
    made = start_cluster(tmp_path, postgres_url)
    yield made
    made.stop()


@pytest.fixture
async def people(cluster: Cluster, tokens: TokenCodec) -> AsyncIterator[People]:
    made = People(cluster, tokens)
    yield made
    await made.aclose()


async def sdk(urls: str | list[str], sid: str, person: Person, name: str) -> Recorder:
    live = await RealtimeConnection(urls, sid, person.token).connect()
    recorder = Recorder(name, live)
    await recorder.barrier()
    return recorder


async def ready(url: str) -> bool:
    try:
        async with httpx.AsyncClient(timeout=2) as http:
            return (await http.get(f"{url}/readyz")).status_code == 200
    except httpx.HTTPError:
        return False


async def online(person: Person, server_url: str, sid: str) -> list[str]:
    return list((await person.on(server_url).get_session(sid))["online"])


# -- Redis killed and restarted ------------------------------------------------------------


async def test_redis_killed_and_restarted_while_clients_chat_loses_nothing(
    cluster: Cluster, people: People
) -> None:
    (alice, bob, carol), sid = await people.group("alice", "bob", "carol")
    a, b = cluster.a.base_url, cluster.b.base_url
    recorders = [
        await sdk(a, sid, alice, "alice@A"),
        await sdk(b, sid, bob, "bob@B"),
        await sdk([a, b], sid, carol, "carol@A"),
        await sdk([b, a], sid, carol, "carol@B"),
    ]
    alice_a, bob_b = recorders[0], recorders[1]
    stop = asyncio.Event()
    outage = asyncio.Event()
    rest_during_outage: list[tuple[str, int, float]] = []
    rest_failures: list[str] = []

    async def rest_sender(person: Person, url: str, tag: str) -> None:
        i = 0
        while not stop.is_set():
            started = time.monotonic()
            in_outage = outage.is_set()
            try:
                sent = await person.on(url).send_message(sid, f"{tag} {i}")
            except (ChatAPIError, httpx.HTTPError) as exc:
                rest_failures.append(f"{tag} {i}: {exc!r}")
            else:
                if in_outage:
                    rest_during_outage.append((tag, sent["seq"], time.monotonic() - started))
            i += 1
            await asyncio.sleep(0.03)

    async def ws_sender(rec: Recorder, tag: str) -> None:
        assert isinstance(rec.conn, RealtimeConnection)
        i = 0
        while not stop.is_set():
            await rec.conn.send_message(f"{tag} {i}")
            i += 1
            await asyncio.sleep(0.04)

    senders = [
        asyncio.create_task(rest_sender(alice, a, "rest@A")),
        asyncio.create_task(rest_sender(bob, b, "rest@B")),
        asyncio.create_task(ws_sender(alice_a, "ws@A")),
        asyncio.create_task(ws_sender(bob_b, "ws@B")),
    ]
    try:
        await asyncio.sleep(0.7)
        cluster.redis.kill()
        outage.set()
        await asyncio.sleep(2.0)  # the instances keep serving without Redis
        assert not any(s.done() for s in senders), [s for s in senders if s.done()]
        outage.clear()
        await asyncio.to_thread(cluster.redis.start)  # same port, empty
        for url in (a, b):
            await eventually(lambda u=url: ready(u), 15, f"{url} ready again after Redis")
        await asyncio.sleep(1.0)  # chatting goes on after the recovery
        stop.set()
        await asyncio.wait_for(asyncio.gather(*senders), 15)
    finally:
        stop.set()
        for task in senders:
            if not task.done():
                task.cancel()

    try:
        assert rest_failures == []
        assert len(rest_during_outage) >= 10, rest_during_outage
        slowest = max(t for _, _, t in rest_during_outage)
        assert slowest < 5, f"a REST send during the outage took {slowest:.1f}s"
        # Both instances subscribed again on their own...
        await eventually(
            lambda: _same(numsub(cluster.redis.url, f"chat:session:{sid}"), 2),
            5,
            "both instances subscribed to the session again",
        )
        # ...so each side's messages reach every client through Redis again (no later
        # message follows these to fill a gap from the database).
        for marker_from in (a, b):
            sent = await alice.on(marker_from).send_message(sid, f"marker from {marker_from}")
            await wait_all(recorders, sent["seq"], timeout=10)
        history = await carol.on(b).history(sid)
        assert [m["seq"] for m in history] == list(range(1, len(history) + 1))
        assert {s for _, s, _ in rest_during_outage} <= {m["seq"] for m in history}  # stored
        for rec in recorders:
            await rec.barrier()
            assert rec.errors() == [], (rec.name, rec.errors())
            assert_complete(rec, history)
        for server in cluster.servers:
            log = server.log()
            assert "delivering locally only" in log  # the outage was logged
            assert "redis bus reconnected" in log
            errors = unhandled_errors(log)
            assert errors == [], f"{server.base_url} logged errors: {errors}"
    finally:
        await stop_all(recorders)


async def test_first_messages_after_a_redis_restart_reach_the_other_instance(
    cluster: Cluster, people: People
) -> None:
    """Redis restarts while the instances are idle. Once both are back (subscribed again),
    the next message of each of several conversations, sent on A, must reach the
    conversation's client on B. Each is the last message of its session, so a publish
    that did not reach Redis would never be repaired by a later one's gap fill."""
    a, b = cluster.a.base_url, cluster.b.base_url
    rooms: list[tuple[Person, str, Recorder]] = []
    try:
        for i in range(12):
            (alice, bob), sid = await people.group(f"alice{i}", f"bob{i}")
            rooms.append((alice, sid, await sdk(b, sid, bob, f"bob{i}@B")))
            await alice.on(a).send_message(sid, "before")
        for _, _, rec in rooms:
            await rec.wait_seq(1, 5)
        cluster.redis.kill()
        await asyncio.sleep(1.0)
        await asyncio.to_thread(cluster.redis.start)
        for _, sid, _ in rooms:
            await eventually(
                lambda sid=sid: _same(numsub(cluster.redis.url, f"chat:session:{sid}"), 1),
                15,
                "B subscribed again",
            )
        for url in (a, b):
            await eventually(lambda u=url: ready(u), 5, f"{url} ready")
        # One message per conversation, sent at the same time (as busy users would).
        sent = await asyncio.gather(
            *(alice.on(a).send_message(sid, "after the restart") for alice, sid, _ in rooms)
        )
        assert [m["seq"] for m in sent] == [2] * len(rooms)
        await asyncio.sleep(3)  # ample: live delivery takes milliseconds
        missed = [rec.name for _, _, rec in rooms if 2 not in rec.seqs]
        local_only = cluster.a.log().count("delivering locally only")
        assert missed == [], (
            f"{len(missed)} of {len(rooms)} clients on B never got the message sent on A "
            f"after Redis came back (A logged {local_only} local-only publishes): {missed}"
        )
    finally:
        await stop_all(rec for _, _, rec in rooms)


async def test_presence_recovers_after_a_redis_restart(cluster: Cluster, people: People) -> None:
    """Redis comes back empty: the instances' heartbeats must put their live connections
    back, so `online` and join/leave events are right again without clients reconnecting."""
    (alice, bob), sid = await people.group("alice", "bob")
    a, b = cluster.a.base_url, cluster.b.base_url
    alice_a = await sdk(a, sid, alice, "alice@A")
    bob_b = await sdk(b, sid, bob, "bob@B")
    try:
        both = sorted([alice.id, bob.id])
        assert await online(alice, a, sid) == both
        cluster.redis.kill()
        await asyncio.sleep(1.0)
        await asyncio.to_thread(cluster.redis.start)
        for url in (a, b):
            await eventually(lambda u=url: ready(u), 15, f"{url} ready again after Redis")
        await asyncio.sleep(TIMEOUT)  # several heartbeats
        seen = (await online(alice, a, sid), await online(bob, b, sid))
        assert seen == (both, both), f"online after the Redis restart: {seen}"
        # Bob leaves: alice hears it, and he is gone from online.
        mark = len(alice_a.frames)
        await bob_b.stop()
        await alice_a.wait_frame(
            lambda f: (
                f.get("type") == "system" and (f["event"], f["user_id"]) == ("user_left", bob.id)
            ),
            TIMEOUT + SWEEP_EVERY + SLACK,
            "bob's user_left after the Redis restart",
            start=mark,
        )
        assert await online(alice, a, sid) == [alice.id]
    finally:
        await stop_all([alice_a, bob_b])


# -- an instance killed with SIGKILL --------------------------------------------------------


async def test_sigkilled_instance_clients_fail_over_and_recover_everything(
    cluster: Cluster, people: People
) -> None:
    (alice, bob, carol, dave), sid = await people.group("alice", "bob", "carol", "dave")
    a, b = cluster.a.base_url, cluster.b.base_url
    alice_a = await sdk([a, b], sid, alice, "alice@A (fails over to B)")
    dave_a = await sdk([a, b], sid, dave, "dave@A (fails over to B)")
    # Bob's client on A does not come back: his presence must expire by itself.
    bob_a = Recorder(
        "bob@A (gone)", await RealtimeConnection(a, sid, bob.token, reconnect=False).connect()
    )
    await bob_a.barrier()
    carol_b = await sdk(b, sid, carol, "carol@B")
    survivors = [alice_a, dave_a, carol_b]
    everyone = [*survivors, bob_a]
    total = 120
    try:
        everybody = sorted(p.id for p in (alice, bob, carol, dave))
        await eventually(
            lambda: _same(online(carol, b, sid), everybody), 5, "all four online before the kill"
        )
        assert await online(carol, a, sid) == everybody

        killed = asyncio.Event()

        async def sender() -> None:
            for i in range(total):
                target = b if killed.is_set() or i % 2 else a
                try:
                    await carol.on(target).send_message(sid, f"m{i}", client_msg_id=f"m{i}")
                except httpx.HTTPError:
                    # In flight to A when it died: retry on B; the client_msg_id makes
                    # sure it is stored once whether or not A had stored it.
                    assert target == a and killed.is_set()
                    await carol.on(b).send_message(sid, f"m{i}", client_msg_id=f"m{i}")
                await asyncio.sleep(0.01)

        sending = asyncio.create_task(sender())
        await alice_a.wait_seq(30, timeout=10)
        mark = len(carol_b.frames)
        loop = asyncio.get_running_loop()
        cluster.a.process.kill()  # SIGKILL: no goodbye, no presence cleanup
        killed_at = loop.time()
        killed.set()
        cluster.a.process.wait(5)

        left = await carol_b.wait_frame(
            lambda f: (
                f.get("type") == "system" and (f["event"], f["user_id"]) == ("user_left", bob.id)
            ),
            TIMEOUT + SWEEP_EVERY + SLACK,
            "user_left for bob, whose instance was killed",
            start=mark,
        )
        took = loop.time() - killed_at
        assert took <= TIMEOUT + SWEEP_EVERY + SLACK, took
        assert left["session_id"] == sid
        await eventually(
            lambda: _same(online(carol, b, sid), sorted([alice.id, carol.id, dave.id])),
            SWEEP_EVERY + SLACK,
            "bob gone from online, alice and dave (failed over) still there",
        )

        await asyncio.wait_for(sending, 30)
        history = await carol.on(b).history(sid)
        assert [m["seq"] for m in history] == list(range(1, total + 1))
        for rec in survivors:
            await rec.wait_seq(total, timeout=15)
            await rec.barrier()
            assert_complete(rec, history)
        for rec in (alice_a, dave_a):
            assert isinstance(rec.conn, RealtimeConnection)
            assert rec.conn.reconnects >= 1, rec.name
            assert rec.conn.base_url == b, rec.name
        # Alice and dave reconnected before their old entries expired: they never left.
        for rec in survivors:
            gone = [f["user_id"] for f in rec.system("user_left")]
            assert alice.id not in gone and dave.id not in gone, (rec.name, gone)
        # Bob's connection is really dead (no reconnect was asked for).
        await eventually(lambda: bob_a.task.done(), 5, "bob's stream ended")
        # And the survivors chat on, over B.
        assert isinstance(alice_a.conn, RealtimeConnection)
        await alice_a.conn.send_message("after the crash")
        for rec in survivors:
            await rec.wait_seq(total + 1, timeout=5)
    finally:
        await stop_all(everyone)


async def _same(value: object, wanted: object) -> bool:
    return (await value) == wanted  # type: ignore[misc]


# -- the SDK repairs server-side closes ------------------------------------------------------


async def test_sdk_resumes_after_its_instance_restarts_on_the_same_port(
    cluster: Cluster, people: People
) -> None:
    (alice, bob), sid = await people.group("alice", "bob")
    a, b = cluster.a.base_url, cluster.b.base_url
    alice_a = await sdk(a, sid, alice, "alice@A (only A)")
    total = 120

    async def sender() -> int:
        i = 0
        while i < total:
            await bob.on(b).send_message(sid, f"m{i}")
            i += 1
            await asyncio.sleep(0.02)
        return i

    sending = asyncio.create_task(sender())
    try:
        await alice_a.wait_seq(20, timeout=10)
        old = cluster.a
        await asyncio.to_thread(old.stop)  # SIGTERM: the server closes its sockets (1012)
        assert old.process.returncode is not None
        await asyncio.sleep(0.3)  # messages keep coming while A is down
        cluster.servers[0] = await asyncio.to_thread(restart_on_same_port, old)
        assert cluster.a.base_url == a
        assert await asyncio.wait_for(sending, 30) == total
        await alice_a.wait_seq(total, timeout=20)
        await alice_a.barrier()
        assert alice_a.closed is None  # the application never saw the drop
        assert isinstance(alice_a.conn, RealtimeConnection)
        assert alice_a.conn.reconnects >= 1
        history = await alice.on(b).history(sid)
        assert_complete(alice_a, history)
    finally:
        if not sending.done():
            sending.cancel()
        await stop_all([alice_a])


async def test_stopping_an_instance_closes_its_sockets_with_1012(
    tmp_path: Path, postgres_url: str, tokens: TokenCodec
) -> None:
    """README, close codes: `1012` server shutting down or restarting (reconnect)."""
    single = start_cluster(tmp_path, postgres_url, count=1)
    people = People(single, tokens)
    try:
        (alice,), sid = await people.group("alice")
        ws = await websockets.connect(ws_address(single.a.base_url, sid, alice.token))
        await frames_until_pong(ws)
        stopping = asyncio.create_task(asyncio.to_thread(single.a.stop))
        code = await close_code(ws, timeout=10)
        await stopping
        assert code == 1012, f"closed with {code} when the instance shut down"
    finally:
        await people.aclose()
        single.stop()


@pytest.fixture(scope="module")
def small_queue_cluster(
    tmp_path_factory: pytest.TempPathFactory, postgres_url: str
) -> Iterator[Cluster]:
    """Instances that cut a connection with 4008 once 4 frames wait for it (nothing is
    killed here, so the tests using it share it)."""
    made = start_cluster(tmp_path_factory.mktemp("small-queue"), postgres_url, WS_SEND_QUEUE_SIZE=4)
    yield made
    made.stop()


async def test_sdk_resumes_after_being_cut_with_4008(
    small_queue_cluster: Cluster, tokens: TokenCodec
) -> None:
    """A burst of pings overflows the 4-frame send queue: the server cuts the connection
    with 4008, the SDK reconnects with since_seq and the caller's stream stays whole."""
    cluster = small_queue_cluster
    people = People(cluster, tokens)
    (alice, bob), sid = await people.group("alice", "bob")
    a, b = cluster.a.base_url, cluster.b.base_url
    total = 120
    log_mark = len(cluster.a.log())
    live = await RealtimeConnection(a, sid, alice.token).connect()

    async def sender() -> None:
        for i in range(total):
            await bob.on(b).send_message(sid, f"m{i}")
            await asyncio.sleep(0.01)

    sending = asyncio.create_task(sender())
    received: list[dict[str, object]] = []
    cuts_at = [20, 60, 90]
    try:
        while not received or received[-1]["seq"] != total:  # type: ignore[comparison-overlap]
            if cuts_at and len(received) >= cuts_at[0]:
                cuts_at.pop(0)
                before = live.reconnects
                for _ in range(200):
                    await live.ping()
                    if live.reconnects > before:
                        break
            frame = await live.receive(15)
            assert frame["type"] != "error", frame
            if frame["type"] == "message":
                received.append(frame)
        await asyncio.wait_for(sending, 30)
        assert live.reconnects >= 2, live.reconnects
        assert "send queue full" in cluster.a.log()[log_mark:]  # the server's 4008s
        history = await alice.on(b).history(sid)
        assert [(f["seq"], f["message_id"]) for f in received] == [
            (m["seq"], m["message_id"]) for m in history
        ]
        assert [f["seq"] for f in received] == list(range(1, total + 1))
    finally:
        if not sending.done():
            sending.cancel()
        await live.close()
        await people.aclose()


async def test_sdk_reader_and_writer_tasks_share_one_connection_after_a_cut(
    small_queue_cluster: Cluster, tokens: TokenCodec
) -> None:
    """The usual application shape: one task iterates the stream, another sends. When the
    server cuts the connection both notice; the SDK must end up with one connection, not
    leave a second one open behind the caller's back."""
    cluster = small_queue_cluster
    people = People(cluster, tokens)
    (alice, bob), sid = await people.group("alice", "bob")
    a, b = cluster.a.base_url, cluster.b.base_url
    alice_a = await sdk(a, sid, alice, "alice@A")
    try:
        live = alice_a.conn
        assert isinstance(live, RealtimeConnection)
        for _ in range(3):
            before = live.reconnects

            async def keep_pinging(before: int = before) -> None:
                # Pings one after another (as a chatty sender would send messages) until
                # the burst gets the connection cut and it has been repaired.
                while live.reconnects == before:
                    await live.ping()
                    await asyncio.sleep(0)

            await asyncio.wait_for(keep_pinging(), 10)
            await asyncio.sleep(0.3)
        # The server holds exactly one connection of alice's (presence lists them all).
        redis = Redis.from_url(cluster.redis.url)
        try:
            await eventually(
                lambda: _same(redis.hlen(f"ws:connections:{alice.id}"), 1),
                3,
                "alice down to one open connection after the cuts",
            )
        except AssertionError:
            count = await redis.hlen(f"ws:connections:{alice.id}")
            raise AssertionError(
                f"after {live.reconnects} reconnects the SDK holds {count} open connections "
                "to the server for one RealtimeConnection (reader and writer each reconnected)"
            ) from None
        finally:
            await redis.aclose()
        # The reader reads the socket the writer writes to: the pong comes back.
        await alice_a.barrier()
        sent = await bob.on(b).send_message(sid, "still here?")
        await alice_a.wait_seq(sent["seq"], 5)
        assert alice_a.closed is None
        await alice_a.stop()
        # Once the caller closed its connection, alice has none left anywhere.
        await eventually(
            lambda: _same(online(bob, b, sid), []),
            3,
            "alice gone from online after closing her only SDK connection",
        )
        assert len([m for m in alice_a.messages if m["seq"] == sent["seq"]]) == 1
    finally:
        await alice_a.stop()
        await people.aclose()


# -- Redis unreachable at start-up ----------------------------------------------------------


@pytest.mark.parametrize(
    "redis_url",
    [
        pytest.param("unreachable", id="nothing-listening"),
        pytest.param("localhost:6379", id="no-scheme"),
    ],
)
def test_serve_without_reachable_redis_is_a_one_line_error(
    tmp_path: Path, postgres_url: str, redis_url: str
) -> None:
    if redis_url == "unreachable":
        redis_url = f"redis://127.0.0.1:{free_port()}/0"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "DATABASE_"))},
        "DATA_DIR": str(tmp_path / "data"),
        "DATABASE_URL": postgres_url,
        "JWT_SECRET_KEY": TEST_SECRET,
        "REDIS_URL": redis_url,
    }
    port = free_port()
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "chatservice.cli", "serve", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0, done
    assert time.monotonic() - started < 20
    output = done.stdout + done.stderr
    assert "Traceback" not in output, f"a traceback instead of a one-line error:\n{output}"
    # Besides the JSON log lines, exactly one line for the operator: the error.
    plain = [line for line in output.splitlines() if line.strip() and not _is_json(line)]
    assert len(plain) == 1, output
    assert plain[0].startswith("error:"), plain
    assert "redis" in plain[0].lower(), plain
    # Nothing was listening meanwhile.
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True
