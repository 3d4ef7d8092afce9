"""`chat-service loadtest` against a real server: counts every delivery, checks order."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TEST_SECRET, ServerProcess, start_server

_SCRIPT = Path(sys.executable).with_name("chat-service")
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "chatservice.cli"]


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    server = start_server(tmp_path_factory.mktemp("loadtest"), LOG_LEVEL="WARNING")
    yield server  # type: ignore[misc]
    server.stop()


def loadtest(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "JWT_SECRET_KEY": TEST_SECRET}
    return subprocess.run(
        [*CLI, "loadtest", *args, "--url", server.base_url, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "args",
    [
        ("fanout", "--rooms", "3", "--members", "6", "--window", "5", "--duration", "1.5"),
        (
            "chat",
            "--rooms",
            "4",
            "--members",
            "3",
            "--senders",
            "3",
            "--rate",
            "5",
            "--duration",
            "1.5",
        ),
        ("idle", "--rooms", "5", "--members", "4"),
    ],
    ids=lambda a: a[0],
)
def test_each_scenario_delivers_everything_in_order(
    target: ServerProcess, args: tuple[str, ...]
) -> None:
    done = loadtest(target, *args)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    rooms, members = int(args[2]), int(args[4])
    assert result["scenario"] == args[0]
    assert result["connected"] == rooms * members
    assert result["sent"] > 0
    assert result["expected_deliveries"] == result["sent"] * members
    assert result["delivered"] == result["expected_deliveries"]
    assert result["lost"] == result["out_of_order"] == result["duplicates"] == 0
    assert result["deliveries_per_s"] > 0
    assert 0 < result["p50_ms"] <= result["p99_ms"] <= result["max_ms"]
    if args[0] == "idle":
        assert result["sent"] == rooms


def test_a_wrong_secret_fails_with_one_line(target: ServerProcess) -> None:
    env = {**os.environ, "JWT_SECRET_KEY": "not-the-servers-secret-but-long-enough"}
    done = subprocess.run(
        [*CLI, "loadtest", "idle", "--rooms", "1", "--members", "1", "--url", target.base_url],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "401" in done.stderr.strip().splitlines()[-1]


def test_an_unknown_scenario_is_refused(target: ServerProcess) -> None:
    done = loadtest(target, "stampede")
    assert done.returncode == 2 and "fanout, chat, idle" in done.stderr
