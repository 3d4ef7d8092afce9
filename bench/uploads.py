#!/usr/bin/env python
"""Upload benchmark: throughput and the server's memory with many large uploads in flight.

    .venv/bin/python bench/uploads.py [--backend sqlite|postgres] [--storage local|s3] \
        [--kind file|image] [--files 20 --size 10000000 --concurrency 20 --rounds 3] \
        [--wait-quiet S]

What it does:

1. Starts one `chat-service serve` the way the other benchmarks do (`bench/agent_streams.py`'s
   `setup`, which builds on `bench/ws_fanout.py`: fixed JWT_SECRET_KEY, LOG_LEVEL=WARNING,
   RATE_LIMIT_ENABLED=false, SQLite in a temporary DATA_DIR or a fresh PostgreSQL database
   on BENCH_POSTGRES_URL that is dropped at the end). `--storage local` keeps blobs in
   DATA_DIR/storage (the default store; it fsyncs every blob). `--storage s3` first starts
   moto's S3 server (`python -m moto.server`, a process of its own on a free port) and gives
   the server FILE_STORAGE_TYPE=s3, S3_BUCKET_NAME, S3_ENDPOINT_URL, S3_REGION and the
   AWS_* credentials. MAX_FILE_SIZE keeps its default (10,485,760 bytes): the default file
   size is 10,000,000 bytes so that it fits.
2. Creates a group session over REST and makes one warm-up upload (not counted).
3. `--rounds` times: waits for a quiet machine (`--wait-quiet`), writes the same bytes with
   plain Python (baselines, below), then uploads `--files` files of `--size` bytes,
   `--concurrency` at a time, with httpx (POST /api/chat/sessions/{id}/files, multipart
   part `file`, declared application/pdf). A file is `%PDF-1.7\\n` and random bytes: the
   server judges it a PDF by its magic bytes, and nothing on the way can compress it.
   With `--kind image` each file is a 4000x3000 JPEG (generated once with Pillow, a few
   MB; every copy carries its own JPEG comment so that no two are the same) and the server
   decodes it and writes a thumbnail. Each image round is preceded by a PDF round of the
   same byte size, so the thumbnail's cost is the difference between the two.
4. Reports per round: MB/s (MB = 10^6 bytes: bytes uploaded / wall time from the first
   request to the last answer), uploads/s, per-upload latency p50/p99/max (with 20 uploads
   p99 is the slowest one), the server's CPU per upload, and the server process's memory:
   VmRSS just before the round, its peak during the round (the kernel's VmHWM, reset just
   before the round through /proc/<pid>/clear_refs; cross-checked by sampling VmRSS every
   20 ms from a thread), and peak minus before. /healthz is probed every 50 ms during the
   round, so a server that stops answering while it takes uploads shows.
5. Baselines in the same round, for the same bytes:
     disk   `--concurrency` threads of this process each write one file and fsync it, in a
            directory beside the server's DATA_DIR (the local store fsyncs every blob too).
     s3     (with --storage s3) the service's own S3BlobStore.put_stream, called from this
            process straight against moto, `--concurrency` at a time: what the store costs
            without HTTP, multipart parsing and the database.
   The ratio upload MB/s / baseline MB/s is printed.
6. At the end downloads every file once (`GET /files/{id}`, `--concurrency` at a time,
   memory sampled as above) and compares its sha256 with what was sent; images also get
   their thumbnail fetched and checked. Exit status 1 if any upload, download or check
   failed or the server logged errors, 2 if the run could not be carried out.

moto keeps every object in its own memory; the memory figures are the chat-service
process's, not moto's (moto's RSS is printed for the record).

Shared with `bench/archive.py` (which imports them from here): the storage setup (`started`),
the memory probe, the /healthz probe, the caller-environment scrub and the table helpers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from agent_streams import Load, Meter, Setup, bearer, setup
from ws_fanout import (
    HOST,
    JWT_SECRET,
    _die_with_parent,
    free_port,
    percentile,
    quiet_machine,
    run_async,
)

from chatservice.auth import TokenCodec

API = "/api/chat"
MB = 1_000_000  # throughput is in MB/s of 10^6 bytes
MOTO_READY_TIMEOUT = 30.0
REQUEST_TIMEOUT = 300.0  # one upload or download on a loaded 2-core machine
S3_REGION = "us-east-1"
S3_KEY = "bench"  # moto accepts any credentials; fixed ones keep the run off ~/.aws
PDF_HEAD = b"%PDF-1.7\n"
# Settings the run defines itself: whatever the caller's shell has must not change it.
_SCRUBBED_PREFIXES = ("FILE_STORAGE", "S3_", "AWS_", "ARCHIVE_", "SESSION_IDLE", "TRANSCRIPT_")
_SCRUBBED = ("MAX_FILE_SIZE", "ALLOWED_FILE_TYPES", "THUMBNAIL_SIZE", "MAX_IMAGE_PIXELS")


# ---------------------------------------------------------------------------------------
# shared with archive.py: environment, storage, memory and responsiveness probes, tables
# ---------------------------------------------------------------------------------------


def scrub_environment() -> None:
    """Drop file/S3/archive settings from this process's environment.

    `server_env` copies os.environ into the server's, so a FILE_STORAGE_TYPE or AWS_PROFILE
    in the caller's shell would otherwise pick the storage or credentials for the run.
    """
    for name in list(os.environ):
        if name.startswith(_SCRUBBED_PREFIXES) or name in _SCRUBBED:
            del os.environ[name]


@dataclass
class Moto:
    """moto's S3 server in a process of its own (objects live in its memory)."""

    process: subprocess.Popen[bytes]
    url: str
    logdir: Path
    bucket: str = field(default_factory=lambda: f"bench-{uuid.uuid4().hex[:12]}")

    def server_env(self) -> dict[str, str]:
        return {
            "FILE_STORAGE_TYPE": "s3",
            "S3_BUCKET_NAME": self.bucket,  # the server creates it at start-up
            "S3_ENDPOINT_URL": self.url,
            "S3_REGION": S3_REGION,
            "AWS_DEFAULT_REGION": S3_REGION,
            "AWS_ACCESS_KEY_ID": S3_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_KEY,
        }

    def stop(self, keep: bool = False) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if keep:
            print(f"kept {self.logdir}", file=sys.stderr)
        else:
            shutil.rmtree(self.logdir, ignore_errors=True)


def start_moto() -> Moto:
    logdir = Path(tempfile.mkdtemp(prefix="chat-bench-moto-"))
    last = ""
    for _attempt in range(3):  # the free port may be taken before moto binds it
        port = free_port()
        log_path = logdir / f"moto-{port}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)],
                cwd=logdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        moto = Moto(process, f"http://{HOST}:{port}", logdir)
        deadline = time.monotonic() + MOTO_READY_TIMEOUT
        while time.monotonic() < deadline and process.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(moto.url, timeout=1)
                return moto
            time.sleep(0.1)
        last = log_path.read_text(errors="replace")[-2000:]
        moto.stop(keep=True)
    shutil.rmtree(logdir, ignore_errors=True)
    raise RuntimeError(f"moto.server did not start:\n{last}")


@dataclass
class Running:
    """One server (and moto, with --storage s3) for the whole run."""

    state: Setup
    moto: Moto | None

    @property
    def server(self) -> Any:
        return self.state.servers[0]

    @property
    def pid(self) -> int:
        return int(self.server.process.pid)

    @property
    def base_url(self) -> str:
        return str(self.server.base_url)

    def meter(self) -> Meter:
        pids = self.state.pids()
        if self.moto is not None:
            pids["moto"] = self.moto.process.pid
        return Meter(pids, self.state.database, self.state.servers)


@contextlib.contextmanager
def started(args: argparse.Namespace, extra_env: dict[str, str], part: str) -> Iterator[Running]:
    """moto (for s3), then the server through agent_streams' `setup`; all torn down after."""
    moto = start_moto() if args.storage == "s3" else None
    try:
        env = {"FILE_STORAGE_TYPE": "local", **extra_env}
        if moto is not None:
            env.update(moto.server_env())
        with setup(args, backend=args.backend, extra_env=env, part=part) as state:
            yield Running(state, moto)
    finally:
        if moto is not None:
            moto.stop(keep=args.keep)


def proc_status_kib(pid: int) -> dict[str, int]:
    """The kB fields of /proc/<pid>/status (VmRSS, VmHWM, …); empty when unreadable."""
    found: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                name, _, rest = line.partition(":")
                parts = rest.split()
                if len(parts) == 2 and parts[1] == "kB":
                    found[name] = int(parts[0])
    except (OSError, ValueError):
        pass
    return found


def loop_thread_cpu(pid: int) -> float:
    """CPU seconds of the process's main thread: the server's event loop (Linux /proc).

    The server's total CPU includes its worker threads (file writes, thumbnails), which a
    second core can run in parallel; the event loop is the part that cannot spread out.
    """
    try:
        with open(f"/proc/{pid}/task/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return math.nan
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reset_peak(pid: int) -> bool:
    """Reset the process's VmHWM to its current RSS (Linux >= 4.0, needs ptrace rights)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


@dataclass
class Memory:
    """A process's resident memory around one measured stretch, in MiB."""

    before: float
    peak: float  # VmHWM after a reset, or the sampled peak when the reset failed
    sampled_peak: float
    after: float
    hwm_reset: bool
    samples: int

    @property
    def growth(self) -> float:
        return self.peak - self.before

    def text(self) -> str:
        how = "VmHWM" if self.hwm_reset else "sampled"
        return (
            f"RSS before {self.before:.0f} MiB, peak {self.peak:.0f} MiB ({how}; sampled "
            f"{self.sampled_peak:.0f}), +{self.growth:.0f} MiB, after {self.after:.0f} MiB"
        )


class MemoryProbe:
    """Peak resident memory of one process while a `with` block runs.

    The kernel's VmHWM is exact but covers the process's whole life, so it is reset on
    entry; a thread samples VmRSS every `interval` s as well, which cross-checks it and
    is the figure used when the reset is not permitted.
    """

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self._stop = threading.Event()
        self._peak_kib = 0
        self._samples = 0
        self._thread: threading.Thread | None = None
        self.result: Memory | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = proc_status_kib(self.pid).get("VmRSS", 0)
            self._peak_kib = max(self._peak_kib, rss)
            self._samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> MemoryProbe:
        self._before = proc_status_kib(self.pid).get("VmRSS", 0)
        self._peak_kib = self._before
        self._reset = reset_peak(self.pid)
        self._thread = threading.Thread(target=self._run, name="rss-probe", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        status = proc_status_kib(self.pid)
        after = status.get("VmRSS", 0)
        sampled = max(self._peak_kib, after)
        peak = max(status.get("VmHWM", 0), sampled) if self._reset else sampled
        self.result = Memory(
            self._before / 1024,
            peak / 1024,
            sampled / 1024,
            after / 1024,
            self._reset,
            self._samples,
        )


class HealthProbe:
    """GET /healthz every `interval` s on a connection of its own, while a block runs.

    A request that takes long means the server's event loop was busy with something
    else (a CPU-bound step on the loop) for that long.
    """

    def __init__(self, base_url: str, interval: float = 0.05) -> None:
        self.base_url = base_url
        self.interval = interval
        self.latencies: list[float] = []
        self.failures = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async with httpx.AsyncClient(base_url=self.base_url, timeout=REQUEST_TIMEOUT) as http:
            while True:
                started = time.perf_counter()
                try:
                    response = await http.get("/healthz")
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.latencies.append(time.perf_counter() - started)
                self.failures += not ok
                await asyncio.sleep(self.interval)

    async def __aenter__(self) -> HealthProbe:
        self._task = asyncio.create_task(self._run())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def text(self) -> str:
        if not self.latencies:
            return "/healthz: no probe completed"
        ordered = sorted(self.latencies)
        return (
            f"/healthz every {self.interval * 1000:.0f} ms: {len(ordered)} probes, p50 "
            f"{percentile(ordered, 0.5) * 1000:.1f} ms, max {ordered[-1] * 1000:.0f} ms"
            + (f", {self.failures} failed" if self.failures else "")
        )

    @property
    def max_ms(self) -> float:
        return max(self.latencies, default=math.nan) * 1000


def load_text(load: Load) -> str:
    """CPU of this run's processes and how busy the rest of the machine was, one line."""
    cpu = ", ".join(f"{name} {share:.0%}" for name, share in load.cpu.items())
    one, five, _ = os.getloadavg()
    return (
        f"cpu (share of one core): {cpu}; other load {load.others:.2f} cores "
        f"({load.before:.2f} busy just before; {load.irq:.2f} of it kernel irq/softirq, "
        f"loopback traffic included); load average {one:.2f} / {five:.2f}; busiest other "
        f"processes: {load.outsiders or '-'}"
    )


def markdown_table(rows: Sequence[dict[str, str]]) -> str:
    if not rows:
        return "(no rows)"
    keys = list(rows[0])
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    out += ["| " + " | ".join(row.get(k, "") for k in keys) + " |" for row in rows]
    return "\n".join(out)


def spread(values: Sequence[float], fmt: str = "{:.0f}") -> str:
    """`min-max` (en dash) of the finite values (one value when they agree when formatted)."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return "-"
    low, high = fmt.format(min(finite)), fmt.format(max(finite))
    return low if low == high else f"{low}\u2013{high}"


def min_median(values: Sequence[float], fmt: str = "{:.0f}") -> str:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return "-"
    return f"{fmt.format(min(finite))} / {fmt.format(statistics.median(finite))}"


def echo_command(script: str, args: argparse.Namespace, names: Sequence[str]) -> str:
    """The command as typed, and as it would read with every option spelled out."""
    typed = shlex.join([".venv/bin/python", script, *sys.argv[1:]])
    full: list[str] = []
    for name in names:
        value = getattr(args, name)
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            full += [flag] if value else []
        elif value is not None:
            full += [flag, str(value)]
    return f"command: {typed}\n  = {shlex.join([script, *full])}"


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument(
        "--storage",
        choices=["local", "s3"],
        default="local",
        help="local: DATA_DIR/storage; s3: the benchmark's own moto server",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each measured round, wait up to this long for an idle machine (the "
        "report shows how busy it was either way)",
    )
    parser.add_argument("--db-pool", type=int, default=20, help="PostgreSQL pool (no overflow)")
    parser.add_argument(
        "--server-profile",
        metavar="PATH",
        help="run the server under cProfile, written to PATH.<part>.server (slows it)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dirs (server log)")
    parser.add_argument("--verbose", action="store_true", help="tracebacks and server logs")


def run_main(args: argparse.Namespace, banner: str, body: Callable[[], int]) -> int:
    """Signals, the banner, and the status codes every bench script uses."""
    # Ctrl-C and SIGTERM end the run through KeyboardInterrupt, so every `finally` on the
    # way out stops the server and moto, drops the database and removes the temp dirs.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def on_sigterm(_signum: int, _frame: object) -> None:
        os.kill(os.getpid(), signal.SIGINT)

    signal.signal(signal.SIGTERM, on_sigterm)
    scrub_environment()
    print(banner, flush=True)
    try:
        return body()
    except KeyboardInterrupt:
        print("interrupted; servers and temporary data cleaned up", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.verbose:
            raise
        print(f"error: {type(exc).__name__}: {exc} (--verbose for the traceback)", file=sys.stderr)
        return 2


def new_user(codec: TokenCodec, label: str, name: str) -> tuple[str, str]:
    """A fresh user id and its token (the name becomes the transcript's display name)."""
    user = f"bench-{label}-{uuid.uuid4().hex[:8]}"
    return user, codec.issue(user, name=name)


async def create_group(http: httpx.AsyncClient, token: str, others: list[str], title: str) -> str:
    response = await http.post(
        f"{API}/sessions",
        json={"kind": "group", "title": title, "participants": others},
        headers=bearer(token),
    )
    if response.status_code not in (200, 201):
        raise RuntimeError(f"POST /sessions: {response.status_code} {response.text[:300]}")
    return str(response.json()["session_id"])


# ---------------------------------------------------------------------------------------
# payloads and baselines
# ---------------------------------------------------------------------------------------


def pdf_payloads(count: int, size: int) -> list[bytes]:
    """`%PDF-1.7` and random bytes: judged a PDF by its head, incompressible throughout."""
    return [PDF_HEAD + os.urandom(size - len(PDF_HEAD)) for _ in range(count)]


def photo_jpeg(width: int, height: int) -> bytes:
    """A photo-like JPEG: a smooth colour field with fine grain, quality 90.

    Grain keeps the file at a phone photo's size (about 3.5 MB at 4000x3000); a flat or
    pure-noise picture would be far smaller or far larger than real uploads.
    """
    from PIL import Image

    field_ = Image.frombytes("RGB", (40, 30), os.urandom(40 * 30 * 3))
    smooth = field_.resize((width, height), Image.Resampling.BICUBIC)
    grain = Image.effect_noise((width, height), 24).convert("RGB")
    picture = Image.blend(smooth, grain, 0.25)
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def jpeg_copies(jpeg: bytes, count: int) -> list[bytes]:
    """`count` different files of one picture: each gets a JPEG comment (COM) of its own."""
    copies = []
    for _ in range(count):
        comment = f"bench {uuid.uuid4().hex}".encode()
        segment = b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment
        copies.append(jpeg[:2] + segment + jpeg[2:])  # right after SOI
    return copies


def disk_baseline(directory: Path, payloads: Sequence[bytes], concurrency: int) -> float:
    """Seconds to write every payload to its own file and fsync it, `concurrency` threads."""
    directory.mkdir(parents=True, exist_ok=True)

    def write(index: int) -> None:
        with open(directory / f"baseline-{index}", "wb") as out:
            out.write(payloads[index])
            out.flush()
            os.fsync(out.fileno())  # as the local blob store does before publishing

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(write, range(len(payloads))))
    elapsed = time.perf_counter() - started
    shutil.rmtree(directory, ignore_errors=True)
    return elapsed


async def s3_store_baseline(
    store: Any, payloads: Sequence[bytes], concurrency: int, label: str
) -> float:
    """Seconds for the service's S3BlobStore.put_stream of every payload, straight to moto."""
    gate = asyncio.Semaphore(concurrency)
    prefix = f"baseline/{label}-{uuid.uuid4().hex[:6]}"

    async def put(index: int) -> None:
        async with gate:
            await store.put_stream(f"{prefix}/{index}", io.BytesIO(payloads[index]), "x/y")

    started = time.perf_counter()
    await asyncio.gather(*(put(i) for i in range(len(payloads))))
    elapsed = time.perf_counter() - started
    await store.delete_prefix(prefix + "/")  # keeps moto's memory to the server's files
    return elapsed


# ---------------------------------------------------------------------------------------
# uploading, downloading, checking
# ---------------------------------------------------------------------------------------


@dataclass
class Uploaded:
    file_id: str
    file_url: str
    thumbnail_url: str | None
    sha256: str
    size: int
    kind: str


@dataclass
class Round:
    label: str
    kind: str
    files: int
    size: int
    elapsed: float
    latencies: list[float]
    memory: Memory
    load: Load
    health: HealthProbe
    disk: float  # baseline seconds
    s3: float | None  # baseline seconds (--storage s3)
    failures: list[str]
    # The server's VmRSS after the warm-up upload: a round's "before" includes whatever
    # earlier rounds left allocated, so growth is shown against this too.
    idle_rss: float = math.nan
    loop_share: float = math.nan  # of one core: the server's event-loop thread
    window: float = math.nan  # seconds the CPU shares were measured over

    @property
    def above_idle(self) -> float:
        return self.memory.peak - self.idle_rss

    @property
    def bytes(self) -> int:
        return self.files * self.size

    @property
    def mb_s(self) -> float:
        return self.bytes / MB / self.elapsed

    @property
    def per_s(self) -> float:
        return self.files / self.elapsed

    @property
    def disk_mb_s(self) -> float:
        return self.bytes / MB / self.disk

    @property
    def s3_mb_s(self) -> float:
        return math.nan if self.s3 is None else self.bytes / MB / self.s3

    @property
    def server_cpu_ms(self) -> float:
        """Server CPU per upload, from its share of a core over the round."""
        return self.load.cpu.get("server", 0.0) * self.window * 1000 / self.files

    def pct_ms(self, q: float) -> float:
        return percentile(sorted(self.latencies), q) * 1000


async def upload(
    http: httpx.AsyncClient,
    session_id: str,
    token: str,
    body: bytes,
    kind: str,
    name: str,
) -> tuple[float, Uploaded | None, str | None]:
    """One upload: (seconds, what the server stored, the problem if it failed)."""
    content_type = "image/jpeg" if kind == "image" else "application/pdf"
    started = time.perf_counter()
    try:
        response = await http.post(
            f"{API}/sessions/{session_id}/files",
            files={"file": (name, body, content_type)},
            headers=bearer(token),
        )
    except httpx.HTTPError as exc:
        return time.perf_counter() - started, None, f"{name}: {type(exc).__name__}: {exc}"
    elapsed = time.perf_counter() - started
    if response.status_code != 201:
        return elapsed, None, f"{name}: HTTP {response.status_code} {response.text[:200]}"
    data = response.json()
    info = data.get("file_info") or {}
    problem = None
    if info.get("size") != len(body) or info.get("type") != content_type:
        problem = f"{name}: stored as {info.get('type')} of {info.get('size')} bytes"
    elif kind == "image" and not data.get("thumbnail_url"):
        problem = f"{name}: no thumbnail"
    done = Uploaded(
        str(data["file_id"]),
        str(data["file_url"]),
        data.get("thumbnail_url"),
        hashlib.sha256(body).hexdigest(),
        len(body),
        kind,
    )
    return elapsed, done, problem


async def upload_all(
    http: httpx.AsyncClient,
    session_id: str,
    token: str,
    payloads: Sequence[bytes],
    kind: str,
    concurrency: int,
    tag: str,
) -> tuple[float, list[float], list[Uploaded], list[str]]:
    gate = asyncio.Semaphore(concurrency)
    extension = "jpg" if kind == "image" else "pdf"

    async def one(index: int) -> tuple[float, Uploaded | None, str | None]:
        async with gate:
            return await upload(
                http, session_id, token, payloads[index], kind, f"{tag}-{index}.{extension}"
            )

    started = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(len(payloads))))
    elapsed = time.perf_counter() - started
    latencies = [seconds for seconds, _, _ in results]
    uploaded = [done for _, done, _ in results if done is not None]
    problems = [problem for _, _, problem in results if problem]
    return elapsed, latencies, uploaded, problems


async def download_all(
    http: httpx.AsyncClient, token: str, files: Sequence[Uploaded], concurrency: int
) -> tuple[float, int, list[str]]:
    """Fetch every file (and thumbnail); (seconds, bytes, problems)."""
    gate = asyncio.Semaphore(concurrency)
    received = 0

    async def one(item: Uploaded) -> str | None:
        nonlocal received
        digest = hashlib.sha256()
        async with gate:
            try:
                async with http.stream("GET", item.file_url, headers=bearer(token)) as response:
                    if response.status_code != 200:
                        return f"{item.file_id}: HTTP {response.status_code}"
                    async for chunk in response.aiter_bytes():
                        digest.update(chunk)
                        received += len(chunk)
                if item.thumbnail_url:
                    thumb = await http.get(item.thumbnail_url, headers=bearer(token))
                    if thumb.status_code != 200 or not thumb.content.startswith(b"\xff\xd8"):
                        return f"{item.file_id}: thumbnail HTTP {thumb.status_code}"
            except httpx.HTTPError as exc:
                return f"{item.file_id}: {type(exc).__name__}: {exc}"
        if digest.hexdigest() != item.sha256:
            return f"{item.file_id}: sha256 differs from the bytes uploaded"
        return None

    started = time.perf_counter()
    results = await asyncio.gather(*(one(item) for item in files))
    return time.perf_counter() - started, received, [r for r in results if r]


# ---------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------


@dataclass
class Outcome:
    rounds: list[Round] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


async def measured_round(
    run: Running,
    http: httpx.AsyncClient,
    args: argparse.Namespace,
    session_id: str,
    token: str,
    payloads: list[bytes],
    kind: str,
    label: str,
    s3_store: Any,
    workdir: Path,
) -> tuple[Round, list[Uploaded]]:
    before = await quiet_machine(args.wait_quiet)
    disk = await asyncio.to_thread(disk_baseline, workdir / "baseline", payloads, args.concurrency)
    s3 = None
    if s3_store is not None:
        s3 = await s3_store_baseline(s3_store, payloads, args.concurrency, label)
    meter = run.meter()
    meter.before = before
    await meter.start(None)
    loop0 = loop_thread_cpu(run.pid)
    with MemoryProbe(run.pid) as memory:
        async with HealthProbe(run.base_url) as health:
            elapsed, latencies, uploaded, problems = await upload_all(
                http, session_id, token, payloads, kind, args.concurrency, label
            )
    loop_seconds = loop_thread_cpu(run.pid) - loop0
    window = time.monotonic() - meter.t0  # the span the meter's CPU shares are over
    load = await meter.stop()
    assert memory.result is not None
    result = Round(
        label,
        kind,
        len(payloads),
        len(payloads[0]),
        elapsed,
        latencies,
        memory.result,
        load,
        health,
        disk,
        s3,
        problems,
    )
    result.loop_share = loop_seconds / window
    result.window = window
    return result, uploaded


def round_lines(r: Round) -> list[str]:
    base = f"disk write+fsync {r.disk_mb_s:.0f} MB/s (uploads at {r.mb_s / r.disk_mb_s:.2f}x)"
    if r.s3 is not None:
        base += f"; S3BlobStore->moto {r.s3_mb_s:.0f} MB/s (uploads at {r.mb_s / r.s3_mb_s:.2f}x)"
    return [
        f"== {r.label}: {r.files} x {r.size:,} bytes ({r.kind}), {r.elapsed:.2f} s",
        f"  throughput: {r.mb_s:.1f} MB/s (10^6 bytes), {r.per_s:.1f} uploads/s; latency p50 "
        f"{r.pct_ms(0.5):.0f} ms, p99 {r.pct_ms(0.99):.0f} ms, max {max(r.latencies) * 1000:.0f}"
        f" ms; server CPU {r.server_cpu_ms:.0f} ms per upload; event-loop thread "
        f"{r.loop_share:.0%} of a core",
        f"  baseline: {base}",
        f"  server memory: {r.memory.text()}; peak - after warm-up {r.above_idle:+.0f} MiB",
        f"  {r.health.text()}",
        f"  {load_text(r.load)}",
        *(f"  problem: {p}" for p in r.failures[:5]),
    ]


def round_row(r: Round, args: argparse.Namespace) -> dict[str, str]:
    row = {
        "backend": args.backend,
        "storage": args.storage,
        "round": r.label,
        "files": f"{r.files} x {r.size / MB:.2f} MB",
        "MB/s": f"{r.mb_s:.1f}",
        "uploads/s": f"{r.per_s:.1f}",
        "p50 ms": f"{r.pct_ms(0.5):.0f}",
        "p99 ms": f"{r.pct_ms(0.99):.0f}",
        "server CPU ms/upload": f"{r.server_cpu_ms:.0f}",
        "disk MB/s (ratio)": f"{r.disk_mb_s:.0f} ({r.mb_s / r.disk_mb_s:.2f})",
        "S3 store MB/s (ratio)": "-"
        if r.s3 is None
        else f"{r.s3_mb_s:.0f} ({r.mb_s / r.s3_mb_s:.2f})",
        "RSS before/peak MiB": f"{r.memory.before:.0f} / {r.memory.peak:.0f}",
        "peak - before MiB": f"{r.memory.growth:+.0f}",
        "peak - after warm-up MiB": f"{r.above_idle:+.0f}",
        "healthz max ms": f"{r.health.max_ms:.0f}",
        "server CPU (loop thread)": f"{r.load.cpu.get('server', 0):.0%} ({r.loop_share:.0%})",
        "other load": f"{r.load.others:.2f}",
    }
    return row


async def bench(run: Running, args: argparse.Namespace) -> Outcome:
    outcome = Outcome()
    codec = TokenCodec(JWT_SECRET)
    _owner, token = new_user(codec, "up", "Uploader")
    peer, _ = new_user(codec, "peer", "Peer")
    workdir = run.state.workdir
    print("preparing payloads …", flush=True)
    if args.kind == "image":
        jpeg = photo_jpeg(args.image_width, args.image_height)
        images = jpeg_copies(jpeg, args.files)
        size = len(images[0])
        outcome.lines.append(
            f"image: {args.image_width}x{args.image_height} JPEG, {size:,} bytes; PDF rounds of "
            "the same size run just before each image round as the no-thumbnail reference"
        )
    else:
        images = []
        size = args.size
    pdfs = pdf_payloads(args.files, size)
    s3_store = None
    if run.moto is not None:
        from chatservice.blobs.s3 import S3BlobStore

        s3_store = S3BlobStore(
            run.moto.bucket,
            endpoint_url=run.moto.url,
            region=S3_REGION,
            access_key_id=S3_KEY,
            secret_access_key=S3_KEY,
        )
        await s3_store.start()
    limits = httpx.Limits(max_connections=args.concurrency + 2, max_keepalive_connections=None)
    everything: list[Uploaded] = []
    try:
        async with httpx.AsyncClient(
            base_url=run.base_url, timeout=REQUEST_TIMEOUT, limits=limits
        ) as http:
            session_id = await create_group(http, token, [peer], "upload bench")
            first = (images or pdfs)[:1]
            _, _, warm, problems = await upload_all(
                http, session_id, token, first, args.kind, 1, "warmup"
            )
            if problems or not warm:
                raise RuntimeError(f"warm-up upload failed: {problems[:1]}")
            everything += warm
            idle = proc_status_kib(run.pid)
            outcome.lines.append(
                f"server after warm-up: VmRSS {idle.get('VmRSS', 0) / 1024:.0f} MiB, "
                f"VmHWM since start {idle.get('VmHWM', 0) / 1024:.0f} MiB"
            )
            print("\n".join(outcome.lines), flush=True)
            outcome.lines.clear()  # printed; what follows is printed with the summary
            for n in range(1, args.rounds + 1):
                plan = [("pdf", pdfs, f"r{n}")]
                if args.kind == "image":
                    plan = [("pdf", pdfs, f"r{n}-pdf"), ("image", images, f"r{n}-jpeg")]
                for kind, payloads, label in plan:
                    result, uploaded = await measured_round(
                        run,
                        http,
                        args,
                        session_id,
                        token,
                        payloads,
                        kind,
                        label,
                        s3_store,
                        workdir,
                    )
                    result.idle_rss = idle.get("VmRSS", 0) / 1024
                    everything += uploaded
                    outcome.rounds.append(result)
                    outcome.problems += result.failures
                    print("\n".join(round_lines(result)), flush=True)

            await quiet_machine(args.wait_quiet)
            with MemoryProbe(run.pid) as memory:
                seconds, received, problems = await download_all(
                    http, token, everything, args.concurrency
                )
            assert memory.result is not None
            outcome.problems += problems
            intact = len(everything) - len(problems)
            outcome.lines.append(
                f"downloads: {len(everything)} files, {received / MB:.0f} MB in {seconds:.1f} s "
                f"({received / MB / seconds:.0f} MB/s, {args.concurrency} at a time); "
                f"server memory {memory.result.text()}"
            )
            outcome.lines.append(
                f"integrity: {'all' if not problems else 'only'} {intact} of "
                f"{len(everything)} files intact (sha256 of the download = of the upload)"
                + ("; thumbnails fetched" if args.kind == "image" else "")
            )
    finally:
        if s3_store is not None:
            await s3_store.close()
    if run.moto is not None:
        moto = proc_status_kib(run.moto.process.pid)
        outcome.lines.append(
            f"moto (holds every object in memory): VmRSS {moto.get('VmRSS', 0) / 1024:.0f} MiB"
        )
    return outcome


def summarise(outcome: Outcome, args: argparse.Namespace) -> list[str]:
    lines = []
    kinds = sorted({r.kind for r in outcome.rounds})
    for kind in kinds:
        rounds = [r for r in outcome.rounds if r.kind == kind]
        s3 = [r.s3_mb_s for r in rounds]
        lines.append(
            f"summary {kind} ({len(rounds)} rounds): {spread([r.mb_s for r in rounds])} MB/s, "
            f"{spread([r.per_s for r in rounds], '{:.1f}')} uploads/s, p50 "
            f"{spread([r.pct_ms(0.5) for r in rounds])} ms, p99 "
            f"{spread([r.pct_ms(0.99) for r in rounds])} ms, server CPU "
            f"{spread([r.server_cpu_ms for r in rounds])} ms/upload; disk "
            f"{spread([r.disk_mb_s for r in rounds])} MB/s (ratio "
            f"{spread([r.mb_s / r.disk_mb_s for r in rounds], '{:.2f}')})"
            + (
                f"; S3 store {spread(s3)} MB/s (ratio "
                f"{spread([r.mb_s / r.s3_mb_s for r in rounds], '{:.2f}')})"
                if args.storage == "s3"
                else ""
            )
            + f"; server RSS peak - before {spread([r.memory.growth for r in rounds], '{:+.0f}')}"
            f" MiB, peak - after warm-up {spread([r.above_idle for r in rounds], '{:+.0f}')}"
            f" MiB (peak {spread([r.memory.peak for r in rounds])} MiB); /healthz max "
            f"{spread([r.health.max_ms for r in rounds])} ms; other load "
            f"{spread([r.load.others for r in rounds], '{:.2f}')}"
        )
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Upload throughput and server memory (see the module docstring)."
    )
    add_common_args(parser)
    parser.add_argument(
        "--kind",
        choices=["file", "image"],
        default="file",
        help="file: PDF-headed random bytes; image: a 4000x3000 JPEG (thumbnail made), each "
        "image round preceded by a PDF round of the same size",
    )
    parser.add_argument("--files", type=int, default=20, help="uploads per round")
    parser.add_argument(
        "--size",
        type=int,
        default=10_000_000,
        help="bytes per file (--kind file); MAX_FILE_SIZE stays at its 10,485,760 default",
    )
    parser.add_argument("--concurrency", type=int, default=20, help="uploads at a time")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds")
    parser.add_argument("--image-width", type=int, default=4000)
    parser.add_argument("--image-height", type=int, default=3000)
    args = parser.parse_args(argv)
    if min(args.files, args.concurrency, args.rounds) < 1 or args.size <= len(PDF_HEAD):
        parser.error("need files, concurrency, rounds >= 1 and size > 9")
    if args.size > 10_485_760:
        parser.error("--size above MAX_FILE_SIZE's default (10,485,760) would be refused")
    return args


ARG_NAMES = (
    "backend",
    "storage",
    "kind",
    "files",
    "size",
    "concurrency",
    "rounds",
    "wait_quiet",
)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    one, five, _ = os.getloadavg()
    banner = (
        f"uploads: {args.backend}, {args.storage} storage, {args.kind}; {os.cpu_count()} cores, "
        f"load average {one:.2f} / {five:.2f}\n{echo_command('bench/uploads.py', args, ARG_NAMES)}"
    )

    def run_all() -> int:
        # `setup` is synchronous (it runs its own event loops for PostgreSQL admin work),
        # so the server starts outside the loop that measures.
        with started(args, {}, part="uploads") as run:
            print(f"server code: {run.state.code}", flush=True)
            outcome = run_async(bench(run, args))
            outcome.problems += run.state.problems()
        for line in outcome.lines:
            print(line)
        print()
        print(markdown_table([round_row(r, args) for r in outcome.rounds]))
        print()
        print("\n".join(summarise(outcome, args)))
        for problem in outcome.problems[:10]:
            print(f"problem: {problem}")
        ok = not outcome.problems
        print(f"result: {'OK' if ok else 'FAILED'}", flush=True)
        return 0 if ok else 1

    return run_main(args, banner, run_all)


if __name__ == "__main__":
    sys.exit(main())
