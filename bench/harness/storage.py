"""Where a file benchmark's server keeps blobs: DATA_DIR/storage (the default local store,
which fsyncs every blob) or S3, served by moto (`python -m moto.server`, a process of its
own that keeps every object in its memory)."""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from harness.machine import HOST, free_port
from harness.run import add_run_args
from harness.server import BASE_SCRUB, die_with_parent, stop_process
from harness.stack import Stack, started

S3_REGION = "us-east-1"
S3_KEY = "bench"  # moto accepts any credentials; fixed ones keep the run off ~/.aws
MOTO_READY_TIMEOUT = 30.0
# Settings the run defines itself: whatever the caller's shell has must not pick the
# storage, the credentials or the limits of the run.
STORAGE_SCRUB = (
    *("FILE_STORAGE", "S3_", "AWS_", "ARCHIVE_", "SESSION_IDLE", "TRANSCRIPT_"),
    *("MAX_FILE_SIZE", "ALLOWED_FILE_TYPES", "THUMBNAIL_SIZE", "MAX_IMAGE_PIXELS"),
)


@dataclass
class Moto:
    process: subprocess.Popen[bytes]
    url: str
    bucket: str = field(default_factory=lambda: f"bench-{uuid.uuid4().hex[:12]}")
    name: str = "moto"

    @property
    def pid(self) -> int:
        return self.process.pid

    def env(self) -> dict[str, str]:
        return {
            "FILE_STORAGE_TYPE": "s3",
            "S3_BUCKET_NAME": self.bucket,  # the server creates it at start-up
            "S3_ENDPOINT_URL": self.url,
            "S3_REGION": S3_REGION,
            "AWS_DEFAULT_REGION": S3_REGION,
            "AWS_ACCESS_KEY_ID": S3_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_KEY,
        }

    def stop(self) -> None:
        stop_process(self.process)


def start_moto(workdir: Path) -> Moto:
    last = ""
    for _attempt in range(3):  # the free port may be taken before moto binds it
        port = free_port()
        log_path = workdir / f"moto-{port}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)],
                cwd=workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
        moto = Moto(process, f"http://{HOST}:{port}")
        deadline = time.monotonic() + MOTO_READY_TIMEOUT
        while time.monotonic() < deadline and process.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(moto.url, timeout=1)
                return moto
            time.sleep(0.1)
        last = log_path.read_text(errors="replace")[-2000:]
        moto.stop()
    raise RuntimeError(f"moto.server did not start:\n{last}")


def moto_of(stack: Stack) -> Moto | None:
    return next((h for h in stack.helpers if isinstance(h, Moto)), None)


def add_storage_args(parser: argparse.ArgumentParser) -> None:
    """--backend and --storage, and harness.run's shared options."""
    parser.add_argument("--backend", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument(
        "--storage",
        choices=["local", "s3"],
        default="local",
        help="local: DATA_DIR/storage; s3: the benchmark's own moto server",
    )
    add_run_args(parser, "PATH.<part>.server")


@contextlib.contextmanager
def started_with_storage(
    args: argparse.Namespace, env: Mapping[str, str], part: str
) -> Iterator[Stack]:
    """One server on `--backend` with `--storage` (moto started first for s3)."""
    # This process talks to moto too (the S3 baseline): the caller's AWS settings must not
    # reach it either.
    for name in [name for name in os.environ if name.startswith(STORAGE_SCRUB)]:
        del os.environ[name]
    profile = args.server_profile
    with started(
        backend=args.backend,
        helpers=[start_moto] if args.storage == "s3" else [],
        env={"FILE_STORAGE_TYPE": "local", **env},
        scrub=(*BASE_SCRUB, *STORAGE_SCRUB),
        db_pool=args.db_pool,
        profile=lambda name: Path(f"{profile}.{part}.{name}").resolve() if profile else None,
        prefix="chat-bench-files",
        keep=args.keep,
        verbose=args.verbose,
    ) as stack:
        yield stack
