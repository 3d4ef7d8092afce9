"""The first thing a user does: start the server, create a session, chat over WebSocket."""

from __future__ import annotations

from chatservice.auth import TokenCodec
from chatservice.client import ChatClient
from tests.conftest import ServerProcess, new_user


async def test_two_users_chat_over_websocket(server: ServerProcess, tokens: TokenCodec) -> None:
    alice, bob = new_user("alice"), new_user("bob")
    async with (
        ChatClient(server.base_url, tokens.issue(alice)) as a,
        ChatClient(server.base_url, tokens.issue(bob)) as b,
    ):
        session = await a.create_session(title="smoke", participants=[bob])
        sid = session["session_id"]
        async with a.realtime(sid) as live_a, b.realtime(sid) as live_b:
            cid = await live_a.send_message("hello bob")
            echo = await live_a.receive_until("message")
            assert echo["client_msg_id"] == cid and echo["seq"] == 1
            got = await live_b.receive_until("message")
            assert got["content"] == "hello bob" and got["sender_id"] == alice
        history = await b.history(sid)
        assert [m["content"] for m in history] == ["hello bob"]
