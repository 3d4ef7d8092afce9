"""The README's code blocks run as written.

Every ```bash and ```python block is run, in order, except those right after a
`<!-- not run… -->` comment. The first block starts the service (`./scripts/serve`); the
others run against it. The only change made to a block is the port: the README's 8003
becomes a free port, so a service a developer runs meanwhile is not touched.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.MULTILINE | re.DOTALL)


@dataclass
class Block:
    language: str
    code: str
    line: int


def runnable_blocks(text: str) -> list[Block]:
    blocks = []
    for match in _FENCE.finditer(text):
        before = text[: match.start()].rstrip()
        if before.endswith("-->") and "not run" in before[before.rfind("<!--") :]:
            continue
        if match.group(1) in ("bash", "python"):
            line = text.count("\n", 0, match.start()) + 1
            blocks.append(Block(match.group(1), match.group(2), line))
    return blocks


def on_port(code: str, port: int) -> str:
    return re.sub(r"\b(localhost|127\.0\.0\.1):8003\b", rf"\g<1>:{port}", code)


def test_the_parser_sees_the_blocks_the_readme_has() -> None:
    blocks = runnable_blocks(README.read_text())
    assert [b.language for b in blocks].count("python") >= 1
    assert blocks[0].code.strip() == "./scripts/serve", "the first block starts the service"
    every = README.read_text().count("```bash") + README.read_text().count("```python")
    assert len(blocks) < every, "the blocks marked `not run` are skipped"


def test_every_readme_block_runs_as_written(tmp_path: Path) -> None:
    blocks = runnable_blocks(README.read_text())
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("JWT_SECRET_KEY", "DATABASE_URL", "REDIS_URL", "DEBUG")
    }
    # The reader's own per-user data directory is not the test's to touch.
    env |= {"DATA_DIR": str(tmp_path / "data"), "SERVICE_PORT": str(port)}
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        serve = subprocess.Popen(
            ["bash", "-c", blocks[0].code], cwd=ROOT, env=env, stdout=out, stderr=out
        )
    try:
        wait_ready(serve, f"http://127.0.0.1:{port}", log)
        token = subprocess.run(
            [str(ROOT / ".venv/bin/chat-service"), "token", "alice"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for block in blocks[1:]:
            code = on_port(block.code, port)
            if block.language == "bash":
                done = subprocess.run(
                    ["bash", "-euo", "pipefail", "-c", code],
                    cwd=ROOT,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
            else:
                script = tmp_path / f"readme_line_{block.line}.py"
                script.write_text(code)
                done = subprocess.run(
                    [sys.executable, str(script)],
                    cwd=tmp_path,
                    env=env | {"TOKEN": token},
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
            where = f"README.md line {block.line}"
            assert done.returncode == 0, f"{where}:\n{done.stdout}\n{done.stderr}"
            assert done.stdout.strip(), f"{where} printed nothing"
            check_output(block, done.stdout)
    finally:
        serve.terminate()
        serve.wait(20)


def check_output(block: Block, stdout: str) -> None:
    """What each kind of block must show beyond exiting 0."""
    if "curl" in block.code:
        # curl -s exits 0 on a 401 too: the answer itself must be a created session.
        body = orjson.loads(stdout)
        assert "error" not in body, body
        assert body["session_id"].startswith("sess_"), body
    if block.language == "python" and "ChatClient" in block.code:
        assert "'content': 'hello'" in stdout, stdout
        assert re.search(r"^[1-9]\d* message\(s\) in history$", stdout, re.MULTILINE), stdout


def wait_ready(process: subprocess.Popen[bytes], base_url: str, log: Path) -> None:
    # The first start may install from uv.lock; later ones only check .venv.
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"./scripts/serve exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    pytest.fail(f"./scripts/serve did not become ready:\n{log.read_text()}")
