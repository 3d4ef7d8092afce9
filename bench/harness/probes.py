"""What a server does while one measured stretch runs: its peak memory, and whether it
keeps answering /healthz."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from dataclasses import dataclass

import httpx

from chatservice.tally import percentile
from harness.machine import proc_status


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
        self._thread: threading.Thread | None = None
        self.result: Memory | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = proc_status(self.pid).get("VmRSS", 0)
            self._peak_kib = max(self._peak_kib, rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> MemoryProbe:
        self._before = proc_status(self.pid).get("VmRSS", 0)
        self._peak_kib = self._before
        self._reset = reset_peak(self.pid)
        self._thread = threading.Thread(target=self._run, name="rss-probe", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        status = proc_status(self.pid)
        after = status.get("VmRSS", 0)
        sampled = max(self._peak_kib, after)
        peak = max(status.get("VmHWM", 0), sampled) if self._reset else sampled
        self.result = Memory(
            self._before / 1024,
            peak / 1024,
            sampled / 1024,
            after / 1024,
            self._reset,
        )


class HealthProbe:
    """GET /healthz every `interval` s on a connection of its own, while a block runs.

    A request that takes long means the server's event loop was busy with something
    else (a CPU-bound step on the loop) for that long.
    """

    def __init__(self, base_url: str, interval: float = 0.05, timeout: float = 300.0) -> None:
        self.base_url = base_url
        self.interval = interval
        self.timeout = timeout
        self.latencies: list[float] = []
        self.failures = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async with httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout) as http:
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
        return (
            f"/healthz every {self.interval * 1000:.0f} ms: {len(self.latencies)} probes, p50 "
            f"{percentile(self.latencies, 0.5) * 1000:.1f} ms, max {self.max_ms:.0f} ms"
            + (f", {self.failures} failed" if self.failures else "")
        )

    @property
    def max_ms(self) -> float:
        return max(self.latencies, default=math.nan) * 1000
