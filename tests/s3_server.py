"""A real S3 endpoint for the tests: moto's server in a process of its own, spoken to over HTTP.

Import the fixture into a test module with `from tests.s3_server import s3_endpoint`.
Buckets live as long as the server (the whole run), so every test takes a fresh one.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiobotocore.session import get_session

# moto accepts any credentials; explicit ones keep the tests off the machine's AWS setup.
S3_REGION = "us-east-1"
S3_ACCESS_KEY_ID = "testing"
S3_SECRET_ACCESS_KEY = "testing"


def new_bucket_name() -> str:
    """A bucket no other test (or earlier start() in this run) has created."""
    return f"test-{uuid.uuid4().hex[:12]}"


def s3_client(endpoint: str, region: str = S3_REGION) -> Any:
    """A raw aiobotocore client (`async with s3_client(url) as s3:`), for inspecting what a
    store left in the bucket."""
    return get_session().create_client(
        "s3",
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id=S3_ACCESS_KEY_ID,
        aws_secret_access_key=S3_SECRET_ACCESS_KEY,
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def start_moto(log_path: Path, port: int | None = None) -> tuple[str, subprocess.Popen[bytes]]:
    """Start `moto.server` on `port` (default: a free one); return its URL once it answers
    HTTP."""
    port = port or _free_port()
    url = f"http://127.0.0.1:{port}"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"moto server exited with {process.returncode}:\n{log_path.read_text()}"
            )
        try:
            httpx.get(url, timeout=1)
            return url, process
        except httpx.HTTPError:
            time.sleep(0.1)
    _stop(process)
    raise RuntimeError(f"moto server did not answer on {url}:\n{log_path.read_text()}")


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a moto S3 server shared by the whole run."""
    url, process = start_moto(tmp_path_factory.mktemp("moto") / "moto.log")
    yield url
    _stop(process)
