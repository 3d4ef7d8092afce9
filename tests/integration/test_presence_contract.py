"""The `Presence` contract (`bus/base.py`), run unchanged against MemoryPresence and
RedisPresence, with a short connection timeout so expiry is observable.

The Redis member runs on a logical database of its own on the tests' Redis: the e2e
servers sharing that Redis sweep presence on database 0, and a sweep by them would take
this suite's expired entries before its own sweep could report them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.exceptions import RedisError

from chatservice.bus.base import ANYWHERE, Presence, PresenceEntry
from tests.conftest import start_redis
from tests.integration.bus_fixtures import MEMBERS, PresenceWorld, unique, with_db

TIMEOUT = 0.3  # seconds a connection stays present without a refresh
PRESENCE_DB = 7


@pytest.fixture(params=MEMBERS)
async def world(request: pytest.FixtureRequest) -> AsyncIterator[PresenceWorld]:
    url = None
    if request.param == "redis":
        url = with_db(request.getfixturevalue("redis_url"), PRESENCE_DB)
    made = PresenceWorld(request.param, TIMEOUT, url)
    yield made
    await made.aclose()


@pytest.fixture
async def redis_world(redis_url: str) -> AsyncIterator[PresenceWorld]:
    made = PresenceWorld("redis", TIMEOUT, with_db(redis_url, PRESENCE_DB))
    yield made
    await made.aclose()


def entry(session_id: str, user_id: str, conn: str | None = None) -> PresenceEntry:
    return PresenceEntry(session_id, user_id, conn or unique("conn"))


async def keep_alive(presence: Presence, entries: list[PresenceEntry], seconds: float) -> None:
    """Heartbeat `entries` every TIMEOUT/4 for `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await presence.refresh(entries)
        await asyncio.sleep(TIMEOUT / 4)


async def sweep_for(
    presence: Presence,
    sessions: set[str],
    seconds: float,
    alive: list[PresenceEntry] | None = None,
) -> list[tuple[str, str]]:
    """Sweep repeatedly for `seconds` (refreshing `alive`); every pair reported for
    `sessions`, in order, duplicates kept. Repeated because only one instance sweeps at
    a time (the Redis sweeper lock lapses after a second)."""
    reported: list[tuple[str, str]] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if alive:
            await presence.refresh(alive)
        reported += [pair for pair in await presence.sweep() if pair[0] in sessions]
        await asyncio.sleep(0.05)
    return reported


async def wait_expired(presence: Presence, session_id: str, user_id: str) -> None:
    """Until `user_id` has dropped out of `online` by expiry alone (no sweep)."""
    deadline = time.monotonic() + 5 * TIMEOUT
    while user_id in await presence.online(session_id):
        assert time.monotonic() < deadline, f"{user_id} still online after {5 * TIMEOUT}s"
        await asyncio.sleep(0.02)


# -- join / leave ----------------------------------------------------------------------------


async def test_first_join_of_a_user_is_reported_and_the_second_device_is_not(
    world: PresenceWorld,
) -> None:
    presence = world.instance()
    session = unique("s")
    phone, laptop = entry(session, "alice"), entry(session, "alice")
    assert await presence.join(phone) is True
    assert await presence.join(laptop) is False
    # Another user's first connection is their own first.
    assert await presence.join(entry(session, "bob")) is True
    # The same user in another session is new there.
    assert await presence.join(entry(unique("s"), "alice")) is True


async def test_leave_of_the_last_connection_is_reported(world: PresenceWorld) -> None:
    presence = world.instance()
    session = unique("s")
    phone, laptop = entry(session, "alice"), entry(session, "alice")
    bob = entry(session, "bob")
    for e in (phone, laptop, bob):
        await presence.join(e)
    assert await presence.leave(phone) is False
    assert await presence.online(session) == ["alice", "bob"]
    assert await presence.leave(laptop) is True
    assert await presence.online(session) == ["bob"]
    assert await presence.leave(bob) is True
    assert await presence.online(session) == []
    # Joining again after leaving is a first join again.
    assert await presence.join(entry(session, "alice")) is True


async def test_leave_of_an_unknown_connection_is_not_a_last_leave(world: PresenceWorld) -> None:
    presence = world.instance()
    session = unique("s")
    await presence.join(entry(session, "alice", "c1"))
    assert await presence.leave(entry(session, "alice", "never-joined")) is False
    assert await presence.online(session) == ["alice"]


async def test_online_lists_users_with_live_connections_only_sorted(
    world: PresenceWorld,
) -> None:
    presence = world.instance()
    session, elsewhere = unique("s"), unique("s")
    carol, alice, bob = entry(session, "carol"), entry(session, "alice"), entry(session, "bob")
    for e in (carol, alice, bob):
        await presence.join(e)
    await presence.join(entry(session, "alice"))  # a second device is listed once
    await presence.join(entry(elsewhere, "dave"))
    assert await presence.online(session) == ["alice", "bob", "carol"]
    assert await presence.online(elsewhere) == ["dave"]
    assert await presence.online(unique("empty")) == []
    await presence.leave(bob)
    assert await presence.online(session) == ["alice", "carol"]


# -- expiry, heartbeats, sweeping -------------------------------------------------------------


async def test_entries_expire_without_refresh_and_refresh_keeps_them(
    world: PresenceWorld,
) -> None:
    presence = world.instance()
    session = unique("s")
    kept, dropped = entry(session, "kept"), entry(session, "dropped")
    await presence.join(kept)
    await presence.join(dropped)
    # Three timeouts long, "kept" is refreshed and stays; "dropped" is not and goes,
    # from `online` by itself, before any sweep.
    await keep_alive(presence, [kept], 3 * TIMEOUT)
    assert await presence.online(session) == ["kept"]
    # A refreshed connection is still the user's: another device is not a first join.
    assert await presence.join(entry(session, "kept")) is False


async def test_sweep_reports_each_lost_user_exactly_once(world: PresenceWorld) -> None:
    presence = world.instance()
    session = unique("s")
    bob = entry(session, "bob")  # stays: refreshed throughout
    alice = entry(session, "alice")  # crashes: never refreshed
    carol_1, carol_2 = entry(session, "carol"), entry(session, "carol")  # loses one of two
    for e in (bob, alice, carol_1, carol_2):
        await presence.join(e)
    await keep_alive(presence, [bob, carol_2], TIMEOUT / 2)
    await presence.refresh([bob, carol_2])
    await wait_expired(presence, session, "alice")

    # Well past the sweeper lock's lifetime, so a second report could not hide behind it.
    reported = await sweep_for(presence, {session}, 1.6, alive=[bob, carol_2])
    assert reported == [(session, "alice")]
    assert await presence.online(session) == ["bob", "carol"]


async def test_sweep_reports_a_user_whose_session_emptied(world: PresenceWorld) -> None:
    """The only user of a session crashes: they lost their last connection, so the sweep
    reports them too (nobody else kept the session's presence alive meanwhile)."""
    presence = world.instance()
    session = unique("s")
    await presence.join(entry(session, "alice"))
    await wait_expired(presence, session, "alice")
    # The hub sweeps once per heartbeat (a quarter of the timeout), not the moment the
    # entry expires.
    await asyncio.sleep(TIMEOUT / 2)
    reported = await sweep_for(presence, {session}, 1.6)
    assert reported == [(session, "alice")]


async def test_leave_after_being_swept_is_not_a_second_last_leave(world: PresenceWorld) -> None:
    presence = world.instance()
    session = unique("s")
    keeper, alice = entry(session, "keeper"), entry(session, "alice")
    await presence.join(keeper)
    await presence.join(alice)
    await keep_alive(presence, [keeper], TIMEOUT / 2)
    await wait_expired(presence, session, "alice")
    reported = await sweep_for(presence, {session}, 1.2, alive=[keeper])
    assert reported == [(session, "alice")]
    # The socket of the swept connection closes later: that must not announce again.
    assert await presence.leave(alice) is False
    assert await presence.online(session) == ["keeper"]
    assert await presence.leave(keeper) is True


async def test_a_swept_user_who_comes_back_is_a_first_join(world: PresenceWorld) -> None:
    presence = world.instance()
    session = unique("s")
    keeper, alice = entry(session, "keeper"), entry(session, "alice")
    await presence.join(keeper)
    await presence.join(alice)
    await keep_alive(presence, [keeper], TIMEOUT / 2)
    await wait_expired(presence, session, "alice")
    await sweep_for(presence, {session}, 1.2, alive=[keeper])
    assert await presence.join(entry(session, "alice")) is True
    assert await presence.online(session) == ["alice", "keeper"]


# -- Redis: instances share presence ----------------------------------------------------------


async def test_redis_instances_see_each_others_users(redis_world: PresenceWorld) -> None:
    one, two = redis_world.instance(), redis_world.instance()
    session = unique("s")
    alice_1, bob = entry(session, "alice"), entry(session, "bob")
    assert await one.join(alice_1) is True
    assert await two.join(bob) is True
    assert await one.online(session) == ["alice", "bob"]
    assert await two.online(session) == ["alice", "bob"]

    # Alice's second device lands on the other instance: not a first join there either.
    alice_2 = entry(session, "alice")
    assert await two.join(alice_2) is False
    assert await one.leave(alice_1) is False
    assert await two.leave(alice_2) is True
    assert await one.online(session) == ["bob"]


async def test_redis_a_crashed_instances_users_are_swept_by_another(
    redis_world: PresenceWorld,
) -> None:
    crashed, survivor = redis_world.instance(), redis_world.instance()
    session = unique("s")
    alice, bob = entry(session, "alice"), entry(session, "bob")
    await crashed.join(alice)  # its instance never refreshes again
    await survivor.join(bob)
    await keep_alive(survivor, [bob], TIMEOUT / 2)
    await wait_expired(survivor, session, "alice")
    reported = await sweep_for(survivor, {session}, 1.2, alive=[bob])
    assert reported == [(session, "alice")]
    assert await crashed.online(session) == ["bob"]


async def test_redis_heartbeats_restore_presence_after_redis_restarts_empty(
    tmp_path: Path,
) -> None:
    """Redis is killed and started again without its data (as the end-to-end failure tests
    in `tests/e2e/test_failures.py` do) while clients stay connected: the next heartbeats
    must make them present again, or `online` shows nobody and their later leave announces
    nothing."""
    redis = start_redis(tmp_path / "redis")
    world = PresenceWorld("redis", 2.0, redis.url)  # long enough not to expire here
    try:
        one, two = world.instance(), world.instance()
        session = unique("s")
        alice, bob = entry(session, "alice"), entry(session, "bob")
        await one.join(alice)
        await two.join(bob)
        redis.kill()
        redis.start()
        deadline = time.monotonic() + 3
        while True:  # heartbeats, as each instance's hub sends them
            try:
                await one.refresh([alice])
                await two.refresh([bob])
                if await one.online(session) == ["alice", "bob"]:
                    break
            except (RedisError, OSError):  # the first command after the restart
                pass
            assert time.monotonic() < deadline, await one.online(session)
            await asyncio.sleep(0.1)
        assert await two.leave(bob) is True
    finally:
        await world.aclose()
        redis.stop()


# -- online anywhere --------------------------------------------------------------------------


async def test_a_user_is_online_anywhere_with_any_live_connection(world: PresenceWorld) -> None:
    presence, other_instance = world.instance(), world.instance()
    alice, bob = unique("alice"), unique("bob")
    assert await presence.user_online(alice) is False
    in_session = entry(unique("s"), alice)
    # A socket that follows no session yet is the user being online too.
    anywhere = entry(ANYWHERE, alice)
    await presence.join(in_session)
    await other_instance.join(anywhere)
    assert await presence.user_online(alice) is True
    assert await other_instance.user_online(alice) is True
    assert await presence.user_online(bob) is False
    await presence.leave(in_session)
    assert await presence.user_online(alice) is True
    await other_instance.leave(anywhere)
    assert await presence.user_online(alice) is False


async def test_online_anywhere_expires_without_refresh(world: PresenceWorld) -> None:
    presence = world.instance()
    kept_user, dropped_user = unique("kept"), unique("dropped")
    kept, dropped = entry(ANYWHERE, kept_user), entry(unique("s"), dropped_user)
    await presence.join(kept)
    await presence.join(dropped)
    await keep_alive(presence, [kept], 3 * TIMEOUT)
    assert await presence.user_online(kept_user) is True
    assert await presence.user_online(dropped_user) is False
