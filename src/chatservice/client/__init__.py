"""Python SDK: `ChatClient` for the REST API, `RealtimeConnection` for the WebSocket.

async with ChatClient("http://127.0.0.1:8003", token) as chat:
    session = await chat.create_session(title="Team", participants=["bob"])
    async with chat.realtime(session["session_id"]) as live:
        await live.send_message("hello")
        async for frame in live:
            print(frame)
"""

from chatservice.client.realtime import ConnectionClosed, RealtimeConnection
from chatservice.client.rest import ChatAPIError, ChatClient

__all__ = ["ChatAPIError", "ChatClient", "ConnectionClosed", "RealtimeConnection"]
