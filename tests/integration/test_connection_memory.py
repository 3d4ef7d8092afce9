"""A closed WebSocket leaves nothing behind for the cyclic garbage collector.

A long-running process runs full collections rarely; whatever a closed connection leaves
in a reference cycle stays allocated until one does, and RSS ratchets up with every peak
of reconnects. A real uvicorn server (the `serve` protocol class) in this process: with
the collector off, WebSockets open and close, and then no handshake protocol and no
WebSocket protocol may remain.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator

import orjson
import pytest
import websockets
from fastapi import FastAPI, WebSocket

from chatservice.api.direct_frames import DirectFramesProtocol, direct_sink
from chatservice.api.header_limit import _BoundedHead
from tests.integration.helpers import serving


def echo_app() -> FastAPI:
    app = FastAPI()

    @app.websocket("/held")
    async def held(websocket: WebSocket) -> None:
        assert websocket.headers["x-padding"]  # the application reads them before accepting
        await websocket.accept()
        protocol = websocket.scope["extensions"]["chatservice.direct_frames"]["protocol"]
        # The websockets parser's frame holds the handshake request as long as the socket.
        request = protocol.conn.parser.gi_frame.f_locals["request"]
        await websocket.send_json(
            {"scope": len(websocket.scope["headers"]), "request": len(request.headers)}
        )
        await websocket.receive_text()

    @app.websocket("/echo")
    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        sink = direct_sink(websocket)  # as the service's connections write
        assert sink is not None
        sink.on_resume(lambda: None)
        async for text in websocket.iter_text():
            sink.write([text.encode()])

    return app


@pytest.fixture
async def ws_url() -> AsyncIterator[str]:
    async with serving(echo_app()) as port:
        yield f"ws://127.0.0.1:{port}/echo"


def live_protocols() -> int:
    # type(), not isinstance(): the heap holds weak proxies to dead objects.
    return sum(
        1 for o in gc.get_objects() if issubclass(type(o), (_BoundedHead, DirectFramesProtocol))
    )


@pytest.mark.parametrize("ending", ["close", "abort"])
async def test_closed_websockets_are_freed_without_the_cyclic_collector(
    ws_url: str, ending: str
) -> None:
    gc.collect()
    before = live_protocols()
    gc.disable()
    try:
        for _ in range(20):
            ws = await websockets.connect(ws_url)
            await ws.send("hello")
            assert await ws.recv() == "hello"
            if ending == "close":
                await ws.close()
            else:
                assert ws.transport is not None
                ws.transport.abort()
        await asyncio.sleep(0.3)  # the server notices the last ones going
        assert live_protocols() == before
    finally:
        gc.enable()


async def test_an_accepted_websocket_keeps_none_of_its_handshake_headers(ws_url: str) -> None:
    held = ws_url.replace("/echo", "/held")
    async with websockets.connect(held, additional_headers={"X-Padding": "x" * 2000}) as ws:
        assert orjson.loads(await ws.recv()) == {"scope": 0, "request": 0}
        await ws.send("bye")
