"""The benchmark's own redis-server: on a free 127.0.0.1 port, no persistence."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from harness.machine import HOST, free_port
from harness.server import die_with_parent, stop_process

READY_TIMEOUT = 10.0


@dataclass
class RedisServer:
    process: subprocess.Popen[bytes]
    port: int

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def stop(self) -> None:
        stop_process(self.process)


def _answers(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(workdir: Path) -> RedisServer:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not on PATH (apt-get install redis-server)")
    last = ""
    for _attempt in range(3):  # the free port may be taken before redis-server binds it
        port = free_port()
        log_path = workdir / f"redis-{port}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [
                    *(binary, "--port", str(port), "--bind", HOST),
                    *("--save", "", "--appendonly", "no", "--dir", str(workdir)),
                ],
                cwd=workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
        server = RedisServer(process, port)
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline and process.poll() is None:
            if _answers(port):
                return server
            time.sleep(0.05)
        server.stop()
        last = log_path.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"redis-server did not start:\n{last}")
