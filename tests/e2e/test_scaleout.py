"""Two real instances on one Redis and one PostgreSQL: one conversation, spread over both.

Clients of a session connect to either instance (SDK and plain `websockets`), senders
use REST and WebSocket on both, and every client must see the same messages in the same
`seq` order, typing and join/leave events from the other instance, one `online` list, and
exactly one Redis subscription per session per instance.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator

import pytest
import websockets

from chatservice.auth import TokenCodec
from chatservice.client import ConnectionClosed, RealtimeConnection
from tests.e2e.scaleout_helpers import (
    Cluster,
    People,
    Person,
    Recorder,
    assert_complete,
    eventually,
    numsub,
    start_cluster,
    stop_all,
    wait_all,
    ws_address,
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, postgres_url: str) -> Iterator[Cluster]:
    # Presence expiry is not under test here (test_failures.py does that with 0.5 / 2 s):
    # a lenient keepalive keeps a loaded machine from cutting the raw clients.
    made = start_cluster(
        tmp_path_factory.mktemp("scaleout"),
        postgres_url,
        WS_HEARTBEAT_INTERVAL=1,
        WS_CONNECTION_TIMEOUT=15,
    )
    yield made
    made.stop()


@pytest.fixture
async def people(cluster: Cluster, tokens: TokenCodec) -> AsyncIterator[People]:
    made = People(cluster, tokens)
    yield made
    await made.aclose()


async def sdk(url: str | list[str], sid: str, token: str, name: str, **kw: object) -> Recorder:
    live = await RealtimeConnection(url, sid, token, **kw).connect()  # type: ignore[arg-type]
    recorder = Recorder(name, live)
    await recorder.barrier()
    return recorder


async def raw(url: str, sid: str, token: str, name: str) -> Recorder:
    ws = await websockets.connect(ws_address(url, sid, token), max_queue=None)
    recorder = Recorder(name, ws)
    await recorder.barrier()
    return recorder


async def test_messages_sent_anywhere_reach_every_client_in_the_same_seq_order(
    cluster: Cluster, people: People
) -> None:
    (alice, bob, carol, dave), sid = await people.group("alice", "bob", "carol", "dave")
    a, b = cluster.a.base_url, cluster.b.base_url
    recorders = [
        await sdk(a, sid, alice.token, "alice-sdk@A"),
        await sdk(b, sid, alice.token, "alice-sdk@B"),
        await sdk(b, sid, bob.token, "bob-sdk@B"),
        await raw(a, sid, carol.token, "carol-raw@A"),
        await raw(b, sid, carol.token, "carol-raw@B"),
        await sdk(a, sid, dave.token, "dave-sdk@A"),
    ]
    alice_a, alice_b, bob_b, carol_a, carol_b, _dave_a = recorders
    per_sender = 15
    try:

        async def rest(person_client: object, tag: str) -> None:
            for i in range(per_sender):
                await person_client.send_message(sid, f"{tag} {i}")  # type: ignore[attr-defined]

        async def over_sdk(rec: Recorder, tag: str) -> None:
            assert isinstance(rec.conn, RealtimeConnection)
            for i in range(per_sender):
                await rec.conn.send_message(f"{tag} {i}")

        async def over_raw(rec: Recorder, tag: str) -> None:
            for i in range(per_sender):
                frame = {"type": "message", "content": f"{tag} {i}", "client_msg_id": f"{tag}{i}"}
                await rec.conn.send(json.dumps(frame))  # type: ignore[union-attr]

        await asyncio.wait_for(
            asyncio.gather(
                rest(alice.on(cluster.a), "alice-rest@A"),
                rest(bob.on(cluster.b), "bob-rest@B"),
                rest(dave.on(cluster.b), "dave-rest@B"),
                over_sdk(alice_a, "alice-ws@A"),
                over_sdk(bob_b, "bob-ws@B"),
                over_raw(carol_a, "carol-ws@A"),
                over_raw(carol_b, "carol-ws@B"),
            ),
            60,
        )
        total = 7 * per_sender
        # Stored first (a WebSocket send is only written to the socket when it returns)...
        await eventually(
            lambda: _equals(_count(bob, cluster.b.base_url, sid), total), 20, "all stored"
        )
        # ...then delivered everywhere.
        await wait_all(recorders, total, timeout=20)
        history = await bob.on(cluster.b).history(sid)
        assert [m["seq"] for m in history] == list(range(1, total + 1))
        assert history == await carol.on(cluster.a).history(sid)  # one source of truth
        for rec in recorders:
            await rec.barrier()  # anything still in flight (a duplicate) has arrived
            assert rec.errors() == [], (rec.name, rec.errors())
            assert_complete(rec, history)
        # Whatever instance a client is on, the frame is the same frame.
        assert alice_a.messages == alice_b.messages == carol_b.messages
    finally:
        await stop_all(recorders)


async def test_typing_crosses_instances_and_is_not_echoed_to_the_typer(
    cluster: Cluster, people: People
) -> None:
    (alice, bob, carol), sid = await people.group("alice", "bob", "carol")
    a, b = cluster.a.base_url, cluster.b.base_url
    alice_a = await sdk(a, sid, alice.token, "alice@A")
    alice_b = await sdk(b, sid, alice.token, "alice@B")  # alice's second device
    bob_b = await sdk(b, sid, bob.token, "bob@B")
    carol_a = await raw(a, sid, carol.token, "carol-raw@A")
    recorders = [alice_a, alice_b, bob_b, carol_a]
    try:
        assert isinstance(alice_a.conn, RealtimeConnection)
        assert isinstance(bob_b.conn, RealtimeConnection)
        await alice_a.conn.typing(True)

        def typing_by(user: str, state: bool) -> object:
            return lambda f: (
                f.get("type") == "typing"
                and (f["user_id"], f["is_typing"])
                == (
                    user,
                    state,
                )
            )

        await bob_b.wait_frame(typing_by(alice.id, True), 5, "alice typing (other instance)")
        await carol_a.wait_frame(typing_by(alice.id, True), 5, "alice typing (same instance)")
        for rec in (alice_a, alice_b):
            await rec.barrier()
            # Give the other instance's copy time to arrive too, then check again.
            await asyncio.sleep(0.3)
            await rec.barrier()
            assert rec.of_type("typing") == [], (rec.name, rec.of_type("typing"))

        # Bob types on B: both of alice's devices hear it, bob's own does not.
        await bob_b.conn.typing(True)
        await alice_a.wait_frame(typing_by(bob.id, True), 5, "bob typing from B")
        await alice_b.wait_frame(typing_by(bob.id, True), 5, "bob typing from B")
        await carol_a.wait_frame(typing_by(bob.id, True), 5, "bob typing from B")
        await asyncio.sleep(0.3)
        await bob_b.barrier()
        assert [f for f in bob_b.of_type("typing") if f["user_id"] == bob.id] == []

        # Alice's device on A goes away while she is typing: the indicator is cleared
        # for the others, on the other instance too.
        await alice_a.stop()
        await bob_b.wait_frame(typing_by(alice.id, False), 5, "alice typing cleared")
        await carol_a.wait_frame(typing_by(alice.id, False), 5, "alice typing cleared")
        # Each indicator change arrived once per connection (no double fan-out).
        for rec in (bob_b, carol_a):
            await rec.barrier()
            alice_states = [
                f["is_typing"] for f in rec.of_type("typing") if f["user_id"] == alice.id
            ]
            assert alice_states == [True, False], (rec.name, alice_states)
        assert await alice.on(cluster.b).history(sid) == []  # typing is never stored
    finally:
        await stop_all(recorders)


async def test_join_and_leave_follow_a_users_first_and_last_connection_across_instances(
    cluster: Cluster, people: People
) -> None:
    (alice, bob, carol), sid = await people.group("alice", "bob", "carol")
    a, b = cluster.a.base_url, cluster.b.base_url
    alice_a = await sdk(a, sid, alice.token, "alice@A")
    carol_b = await sdk(b, sid, carol.token, "carol@B")
    watchers = [alice_a, carol_b]
    bobs: list[Recorder] = []
    try:
        bobs.append(await raw(b, sid, bob.token, "bob-1@B"))
        for w in watchers:
            await w.wait_frame(
                lambda f: (
                    f.get("type") == "system"
                    and (f["event"], f["user_id"]) == ("user_joined", bob.id)
                ),
                5,
                "bob joined",
            )
        # Bob's second device, on the other instance: he was already here.
        bobs.append(await sdk(a, sid, bob.token, "bob-2@A"))
        await asyncio.sleep(0.3)
        for w in watchers:
            await w.barrier()
            assert len(w.system("user_joined", bob.id)) == 1, (w.name, w.system())

        # One device leaves (B): bob still has one on A, so nobody hears he left.
        await bobs[0].stop()
        await asyncio.sleep(0.5)
        for w in watchers:
            await w.barrier()
            assert w.system("user_left", bob.id) == [], (w.name, w.system())

        # The last one leaves (A): both instances announce it, once.
        await bobs[1].stop()
        for w in watchers:
            left = await w.wait_frame(
                lambda f: (
                    f.get("type") == "system"
                    and (f["event"], f["user_id"]) == ("user_left", bob.id)
                ),
                5,
                "bob left",
            )
            assert left["timestamp"].endswith("Z")
        await asyncio.sleep(0.3)
        for w in watchers:
            await w.barrier()
            assert len(w.system("user_left", bob.id)) == 1, (w.name, w.system())
    finally:
        await stop_all(watchers + bobs)


async def test_online_is_the_same_from_either_instance(cluster: Cluster, people: People) -> None:
    (alice, bob, _carol), sid = await people.group("alice", "bob", "carol")
    a, b = cluster.a.base_url, cluster.b.base_url

    async def online_from_both() -> tuple[list[str], list[str]]:
        on_a = (await alice.on(cluster.a).get_session(sid))["online"]
        on_b = (await bob.on(cluster.b).get_session(sid))["online"]
        return on_a, on_b

    assert await online_from_both() == ([], [])
    alice_a = await sdk(a, sid, alice.token, "alice@A")
    bob_b = await sdk(b, sid, bob.token, "bob@B")
    bob_a = await sdk(a, sid, bob.token, "bob@A")
    recorders = [alice_a, bob_b, bob_a]
    try:
        both = sorted([alice.id, bob.id])
        assert await online_from_both() == (both, both)

        await bob_b.stop()  # bob still has his device on A
        await asyncio.sleep(0.3)
        assert await online_from_both() == (both, both)

        await bob_a.stop()
        wanted = ([alice.id], [alice.id])
        await eventually(
            lambda: _equals(online_from_both(), wanted), 5, "bob gone from online on A and B"
        )
        await alice_a.stop()
        await eventually(lambda: _equals(online_from_both(), ([], [])), 5, "nobody online")
    finally:
        await stop_all(recorders)


async def _count(person: Person, url: str, sid: str) -> int:
    return int((await person.on(url).list_messages(sid, limit=1))["total"])


async def _equals(value: object, wanted: object) -> bool:
    return (await value) == wanted  # type: ignore[misc]


async def test_client_moving_between_instances_misses_nothing(
    cluster: Cluster, people: People
) -> None:
    """A receiver hops A → B → A → B (SDK and raw) with since_seq while messages keep
    arriving over REST on both instances and over WebSocket on B."""
    (alice, bob), sid = await people.group("alice", "bob")
    total = 160
    sent = 0

    async def sender() -> None:
        nonlocal sent
        live = await RealtimeConnection(cluster.b.base_url, sid, bob.token).connect()
        try:
            for i in range(total):
                if i % 3 == 0:
                    await live.send_message(f"ws@B {i}")
                elif i % 3 == 1:
                    await bob.on(cluster.a).send_message(sid, f"rest@A {i}")
                else:
                    await bob.on(cluster.b).send_message(sid, f"rest@B {i}")
                sent += 1
                await asyncio.sleep(0.005)
        finally:
            await live.close()

    hops = [
        ("sdk", cluster.a.base_url, 25),
        ("sdk", cluster.b.base_url, 60),
        ("raw", cluster.a.base_url, 95),
        ("raw", cluster.b.base_url, 125),
        ("sdk", cluster.a.base_url, total),
    ]
    segments: list[tuple[str, int, list[int]]] = []
    since = 0  # the sender may be ahead of alice's first connection
    received_frames: list[dict[str, object]] = []
    sending = asyncio.create_task(sender())
    try:
        for kind, url, until in hops:
            seen: list[int] = []
            segments.append((f"{kind}@{url}", since, seen))
            if kind == "sdk":
                live = await RealtimeConnection(url, sid, alice.token, since_seq=since).connect()
                try:
                    while not seen or seen[-1] < until:
                        frame = await live.receive(15)
                        assert frame["type"] != "error", frame
                        if frame["type"] == "message":
                            seen.append(frame["seq"])
                            received_frames.append(frame)
                    assert live.reconnects == 0
                finally:
                    await live.close()
            else:
                ws = await websockets.connect(
                    ws_address(url, sid, alice.token, since_seq=since), max_queue=None
                )
                try:
                    while not seen or seen[-1] < until:
                        frame = json.loads(await asyncio.wait_for(ws.recv(), 15))
                        assert frame["type"] != "error", frame
                        if frame["type"] == "message":
                            seen.append(frame["seq"])
                            received_frames.append(frame)
                finally:
                    await ws.close()
            since = seen[-1]
            await asyncio.sleep(0.05)  # messages keep coming while alice is away
        await asyncio.wait_for(sending, 30)
    finally:
        if not sending.done():
            sending.cancel()
    assert sent == total
    for name, since_seq, seen in segments:
        start = since_seq + 1
        assert seen == list(range(start, start + len(seen))), (name, since_seq, seen)
    history = await alice.on(cluster.b).history(sid)
    assert [s for _, _, seen in segments for s in seen] == list(range(1, total + 1))
    assert [(f["seq"], f["message_id"]) for f in received_frames] == [
        (m["seq"], m["message_id"]) for m in history
    ]


async def test_one_redis_subscription_per_session_per_instance(
    cluster: Cluster, people: People
) -> None:
    (alice, bob, carol), sid = await people.group("alice", "bob", "carol")
    a, b = cluster.a.base_url, cluster.b.base_url
    channels = [f"chat:session:{sid}", f"chat:typing:{sid}", f"chat:presence:{sid}"]

    async def counts() -> list[int]:
        return [await numsub(cluster.redis.url, c) for c in channels]

    async def settle(wanted: int, what: str) -> None:
        await eventually(lambda: _equals(counts(), [wanted] * 3), 5, what)

    assert await counts() == [0, 0, 0]
    on_a: list[Recorder] = []
    on_b: list[Recorder] = []
    try:
        # Five connections on A (three users, SDK and raw): one subscription.
        on_a.append(await sdk(a, sid, alice.token, "alice-1@A"))
        on_a.append(await sdk(a, sid, alice.token, "alice-2@A"))
        on_a.append(await raw(a, sid, bob.token, "bob@A"))
        on_a.append(await sdk(a, sid, carol.token, "carol@A"))
        on_a.append(await raw(a, sid, carol.token, "carol-2@A"))
        assert await counts() == [1, 1, 1]
        # Connections on B: the second instance subscribes once, whatever their number.
        on_b.append(await sdk(b, sid, bob.token, "bob@B"))
        assert await counts() == [2, 2, 2]
        on_b.append(await raw(b, sid, carol.token, "carol@B"))
        on_b.append(await sdk(b, sid, alice.token, "alice@B"))
        assert await counts() == [2, 2, 2]
        # Traffic does not change it either.
        await alice.on(cluster.a).send_message(sid, "hello")
        for rec in on_a + on_b:
            await rec.wait_seq(1, 5)
        assert await counts() == [2, 2, 2]

        # A loses all but one connection: still subscribed; then the last one: not.
        for rec in on_a[1:]:
            await rec.stop()
        await asyncio.sleep(0.3)
        assert await counts() == [2, 2, 2]
        await on_a[0].stop()
        await settle(1, "A unsubscribed after its last connection left")
        for rec in on_b:
            await rec.stop()
        await settle(0, "no subscription left once every connection is gone")

        # Coming back subscribes again (and only once).
        again = [await sdk(b, sid, bob.token, "bob-again@B"), await raw(b, sid, bob.token, "x")]
        on_b.extend(again)
        assert await counts() == [1, 1, 1]
    finally:
        await stop_all(on_a + on_b)


async def test_sdk_refusals_are_not_retried(cluster: Cluster, people: People) -> None:
    """4400/4401/4403/4404 end the SDK stream at once, without a reconnect."""
    (alice,), sid = await people.group("alice")
    outsider = people("outsider")
    cases = [
        ("bad token", sid, "not-a-jwt", None, 4401),
        ("not a participant", sid, outsider.token, None, 4403),
        ("no such session", "sess_doesnotexist0000000000", alice.token, None, 4404),
        ("bad since_seq", sid, alice.token, -1, 4400),
    ]
    for name, session_id, token, since, code in cases:
        live = RealtimeConnection(
            [cluster.b.base_url, cluster.a.base_url], session_id, token, since_seq=since
        )
        await live.connect()
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ConnectionClosed) as closed:
            await live.receive(10)
        assert closed.value.code == code, name
        assert live.reconnects == 0, name
        assert loop.time() - started < 2, name
        frames = [f async for f in live]  # the iterator simply ends
        assert frames == [], name
        assert live.reconnects == 0, name
        await live.close()


async def test_removed_member_on_the_other_instance_is_closed_and_not_reconnected(
    cluster: Cluster, people: People
) -> None:
    (alice, bob), sid = await people.group("alice", "bob")
    bob_b = await sdk([cluster.b.base_url, cluster.a.base_url], sid, bob.token, "bob@B")
    try:
        await alice.on(cluster.a).remove_participant(sid, bob.id)
        await bob_b.wait_frame(
            lambda f: f.get("type") == "system" and f["event"] == "participant_removed",
            5,
            "participant_removed from A",
        )
        await eventually(lambda: bob_b.task.done(), 5, "bob's stream ended")
        assert isinstance(bob_b.closed, ConnectionClosed), bob_b.closed
        assert bob_b.closed.code == 4403
        assert isinstance(bob_b.conn, RealtimeConnection)
        assert bob_b.conn.reconnects == 0
    finally:
        await bob_b.stop()
