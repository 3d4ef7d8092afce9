"""An unhandled error is a 500 with the usual body, and the keep-alive connection survives.

A real uvicorn server (httptools, as `serve` runs it) on a free port, with an application
whose route raises; one HTTP/1.1 connection carries failing and working requests in turn.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from fastapi import FastAPI

from chatservice.api.safety import ResponseSafety
from tests.integration.helpers import serving


def failing_app() -> FastAPI:
    app = FastAPI()

    @app.get("/boom")
    async def boom() -> dict[str, str]:
        raise RuntimeError("a bug, not the client's fault")

    @app.get("/fine")
    async def fine() -> dict[str, str]:
        return {"ok": "yes"}

    app.add_middleware(ResponseSafety)
    return app


@pytest.fixture
async def base_url() -> AsyncIterator[str]:
    async with serving(failing_app()) as port:
        yield f"http://127.0.0.1:{port}"


async def test_a_500_keeps_the_connection_usable(base_url: str) -> None:
    """One raw TCP connection: after each 500 the next request on it is answered."""
    host, port = base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        for _ in range(20):
            for path, status in (("/boom", 500), ("/fine", 200)):
                writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                await writer.drain()
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert head.startswith(f"HTTP/1.1 {status} ".encode()), head
                assert b"connection: close" not in head.lower()
                assert b"x-content-type-options: nosniff" in head.lower()
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                body = await reader.readexactly(length)
                if status == 500:
                    assert body == b'{"error":{"code":"INTERNAL","message":"internal error"}}'
    finally:
        writer.close()
