#!/usr/bin/env python
"""Upload benchmark: throughput and the server's memory with many large uploads in flight.

    .venv/bin/python bench/uploads.py [--backend sqlite|postgres] [--storage local|s3] \
        [--kind file|image] [--files 20 --size 10000000 --concurrency 20 --rounds 3] \
        [--wait-quiet S]

What it does:

1. Starts one `chat-service serve` the way the other benchmarks do (bench/harness: fixed
   JWT_SECRET_KEY, LOG_LEVEL=WARNING, RATE_LIMIT_ENABLED=false, SQLite in a temporary
   DATA_DIR or a fresh PostgreSQL database on BENCH_POSTGRES_URL that is dropped at the
   end; the caller's file, S3, AWS, archive and transcript settings are left out, from
   this process's environment too). `--storage local` keeps blobs in
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
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import math
import os
import shutil
import sys
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from harness.clients import API, bearer, create_session, new_user
from harness.machine import cpu_seconds, proc_status, quiet_machine
from harness.meter import Load
from harness.probes import HealthProbe, Memory, MemoryProbe
from harness.report import markdown_table, spread
from harness.run import echo_command, guarded, run_async
from harness.stack import Stack
from harness.storage import S3_KEY, S3_REGION, add_storage_args, moto_of, started_with_storage

from chatservice.tally import percentile

MB = 1_000_000  # throughput is in MB/s of 10^6 bytes
REQUEST_TIMEOUT = 300.0  # one upload or download on a loaded 2-core machine
PDF_HEAD = b"%PDF-1.7\n"


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
        return percentile(self.latencies, q) * 1000


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
    stack: Stack,
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
    server = stack.servers[0]
    meter = stack.meter()
    meter.before = before
    await meter.start(None)
    # The main thread is the server's event loop: the part of its work that cannot spread
    # over a second core as its worker threads (file writes, thumbnails) can.
    loop0 = cpu_seconds(server.pid, thread=server.pid)
    with MemoryProbe(server.pid) as memory:
        async with HealthProbe(server.base_url, timeout=REQUEST_TIMEOUT) as health:
            elapsed, latencies, uploaded, problems = await upload_all(
                http, session_id, token, payloads, kind, args.concurrency, label
            )
    loop_seconds = cpu_seconds(server.pid, thread=server.pid) - loop0
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
        f"  {r.load.text()}",
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


async def bench(stack: Stack, args: argparse.Namespace) -> Outcome:
    outcome = Outcome()
    server, moto = stack.servers[0], moto_of(stack)
    _owner, token = new_user("up", "Uploader")
    peer, _ = new_user("peer", "Peer")
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
    if moto is not None:
        from chatservice.blobs.s3 import S3BlobStore

        s3_store = S3BlobStore(
            moto.bucket,
            endpoint_url=moto.url,
            region=S3_REGION,
            access_key_id=S3_KEY,
            secret_access_key=S3_KEY,
        )
        await s3_store.start()
    limits = httpx.Limits(max_connections=args.concurrency + 2, max_keepalive_connections=None)
    everything: list[Uploaded] = []
    try:
        async with httpx.AsyncClient(
            base_url=server.base_url, timeout=REQUEST_TIMEOUT, limits=limits
        ) as http:
            session_id = await create_session(
                http, token, kind="group", title="upload bench", participants=[peer]
            )
            first = (images or pdfs)[:1]
            _, _, warm, problems = await upload_all(
                http, session_id, token, first, args.kind, 1, "warmup"
            )
            if problems or not warm:
                raise RuntimeError(f"warm-up upload failed: {problems[:1]}")
            everything += warm
            idle = proc_status(server.pid)
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
                        stack,
                        http,
                        args,
                        session_id,
                        token,
                        payloads,
                        kind,
                        label,
                        s3_store,
                        stack.workdir,
                    )
                    result.idle_rss = idle.get("VmRSS", 0) / 1024
                    everything += uploaded
                    outcome.rounds.append(result)
                    outcome.problems += result.failures
                    print("\n".join(round_lines(result)), flush=True)

            await quiet_machine(args.wait_quiet)
            with MemoryProbe(server.pid) as memory:
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
    if moto is not None:
        rss = proc_status(moto.pid).get("VmRSS", 0)
        outcome.lines.append(f"moto (holds every object in memory): VmRSS {rss / 1024:.0f} MiB")
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
    add_storage_args(parser)
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
        print(banner, flush=True)
        # Starting is synchronous (it runs its own event loops for PostgreSQL admin work),
        # so the server starts outside the loop that measures.
        with started_with_storage(args, {}, part="uploads") as stack:
            print(f"server code: {stack.code}", flush=True)
            outcome = run_async(bench(stack, args))
            outcome.problems += stack.problems()
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

    return guarded(run_all, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
