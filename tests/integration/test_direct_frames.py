"""Batched frames written straight to the socket (`api/direct_frames.py`), read back by
a real WebSocket client: every payload length the frame header encodes differently,
non-ASCII text, many frames in one write, and permessage-deflate when it is on."""

from __future__ import annotations

import pytest
import websockets
from fastapi import FastAPI, WebSocket

from chatservice.api.direct_frames import direct_sink
from tests.integration.helpers import serving

# Lengths around each header form: 7-bit, 16-bit and 64-bit.
SIZES = [0, 1, 125, 126, 127, 65_535, 65_536, 300_000]


def batch_app() -> FastAPI:
    app = FastAPI()

    @app.websocket("/batch")
    async def batch(websocket: WebSocket) -> None:
        await websocket.accept()
        sink = direct_sink(websocket)
        assert sink is not None, "served without the batched protocol"
        async for text in websocket.iter_text():
            # "n c": n frames of c repeated to each of SIZES, in one write.
            count, char = text.split(" ")
            frames = [(char * size).encode() for size in SIZES] * int(count)
            sink.write(frames)

    return app


@pytest.mark.parametrize("deflate", [False, True], ids=["plain", "permessage-deflate"])
async def test_batched_frames_arrive_whole_and_in_order(deflate: bool) -> None:
    async with serving(batch_app(), ws_per_message_deflate=deflate) as port:
        compression = "deflate" if deflate else None
        async with websockets.connect(
            f"ws://127.0.0.1:{port}/batch", max_size=2**21, compression=compression
        ) as ws:
            assert bool(ws.protocol.extensions) == deflate
            for char in ("a", "é", "😀"):
                await ws.send(f"3 {char}")
                for _ in range(3):
                    for size in SIZES:
                        assert await ws.recv() == char * size
