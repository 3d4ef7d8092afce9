"""Membership changes reach live connections; a removed member's socket closes with 4403."""

from __future__ import annotations

import httpx

from chatservice.auth import TokenCodec
from chatservice.client import ChatClient, ConnectionClosed
from tests.conftest import ServerProcess, new_user


async def test_removal_is_announced_and_closes_the_removed_members_socket(
    server: ServerProcess, tokens: TokenCodec
) -> None:
    owner, bob, carol = new_user("owner"), new_user("bob"), new_user("carol")
    async with (
        ChatClient(server.base_url, tokens.issue(owner)) as o,
        ChatClient(server.base_url, tokens.issue(bob)) as b,
    ):
        sid = (await o.create_session(title="team", participants=[bob]))["session_id"]
        async with o.realtime(sid) as owner_live, b.realtime(sid) as bob_live:
            added = await o.add_participants(sid, [carol])
            assert added["added"] == [carol]
            frame = await bob_live.receive_until("system")
            while frame["event"] != "participant_added":
                frame = await bob_live.receive_until("system")
            assert frame["user_id"] == carol and frame["by"] == owner

            await o.remove_participant(sid, bob)
            closed_with = None
            try:
                while True:
                    await bob_live.receive(timeout=5)
            except ConnectionClosed as exc:
                closed_with = exc.code
            assert closed_with == 4403
            removed = await owner_live.receive_until("system")
            while removed["event"] != "participant_removed":
                removed = await owner_live.receive_until("system")
            assert removed["user_id"] == bob
        async with httpx.AsyncClient(base_url=server.base_url) as raw:
            response = await raw.get(
                f"/api/chat/sessions/{sid}",
                headers={"Authorization": f"Bearer {tokens.issue(bob)}"},
            )
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "FORBIDDEN"


async def test_only_the_owner_changes_members(server: ServerProcess, tokens: TokenCodec) -> None:
    owner, bob = new_user("owner"), new_user("bob")
    async with httpx.AsyncClient(base_url=server.base_url) as raw:
        auth_owner = {"Authorization": f"Bearer {tokens.issue(owner)}"}
        auth_bob = {"Authorization": f"Bearer {tokens.issue(bob)}"}
        created = await raw.post(
            "/api/chat/sessions", json={"participants": [bob]}, headers=auth_owner
        )
        sid = created.json()["session_id"]
        denied = await raw.post(
            f"/api/chat/sessions/{sid}/participants",
            json={"user_ids": [new_user()]},
            headers=auth_bob,
        )
        assert denied.status_code == 403
        invalid = await raw.post(
            f"/api/chat/sessions/{sid}/participants", json={"user_ids": "x"}, headers=auth_owner
        )
        assert invalid.status_code == 422
        left = await raw.delete(f"/api/chat/sessions/{sid}/participants/{bob}", headers=auth_bob)
        assert left.status_code == 200 and left.json()["removed"] == bob
