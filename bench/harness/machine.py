"""This machine and its processes, read from Linux's /proc, and the code being measured.

CPU figures are seconds of user + system time; a share of a core is seconds over the
wall time they were used in. Every reader returns an empty or zero value for a process
that is gone rather than raising: a benchmark samples processes that may just have ended.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from pathlib import Path

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[2]  # the checkout whose src/ is measured
_TICK = os.sysconf("SC_CLK_TCK")

ProcessCpu = dict[int, tuple[str, float]]  # pid -> (command name, CPU seconds)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _stat_cpu(stat: bytes) -> float:
    # The command name (in parentheses) may hold spaces: count fields after its end.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """CPU time of a process, or of one of its threads (the main thread's id is the pid)."""
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    try:
        with open(path, "rb") as handle:
            return _stat_cpu(handle.read())
    except OSError:
        return 0.0


def proc_status(pid: int) -> dict[str, int]:
    """The numeric fields of /proc/<pid>/status: VmRSS and VmHWM in KiB, Threads, …"""
    found: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                name, _, rest = line.partition(":")
                value = rest.split()
                if value and value[0].isdigit():
                    found[name] = int(value[0])
    except OSError:
        pass
    return found


def rss_mib(pid: int) -> float:
    return proc_status(pid).get("VmRSS", 0) / 1024


def _cpu_line() -> list[int]:
    try:
        with open("/proc/stat") as handle:
            return [int(v) for v in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return []


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of all cores since boot; idle and iowait are not busy."""
    values = _cpu_line()
    if len(values) < 8:
        return 0.0, 0.0
    total = sum(values[:8])
    return (total - values[3] - values[4]) / _TICK, total / _TICK


def machine_busy_seconds() -> float:
    return machine_cpu()[0]


def kernel_irq_seconds() -> float:
    """CPU seconds all cores spent in hard and soft interrupts, which no process is charged."""
    return sum(_cpu_line()[5:7]) / _TICK


def process_cpu() -> ProcessCpu:
    """CPU seconds of every process on the machine."""
    found: ProcessCpu = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        name = stat[stat.index(b"(") + 1 : stat.rindex(b")")].decode(errors="replace")
        found[int(entry)] = (name, _stat_cpu(stat))
    return found


def top_outsiders(before: ProcessCpu, after: ProcessCpu, ours: set[int], elapsed: float) -> str:
    """The three busiest processes that are not part of this run, as `name(pid) share`."""
    used = [
        (cpu - before.get(pid, (name, 0.0))[1], name, pid)
        for pid, (name, cpu) in after.items()
        if pid not in ours
    ]
    used.sort(reverse=True)
    return ", ".join(
        f"{name}({pid}) {seconds / elapsed:.0%}" for seconds, name, pid in used[:3] if seconds > 0
    )


async def quiet_machine(wait: float) -> float:
    """Cores busy over the last two seconds; waits up to `wait` s for them to be < 0.25."""
    deadline = time.monotonic() + wait
    samples: list[float] = []
    while True:
        before = machine_busy_seconds()
        await asyncio.sleep(1.0)
        samples = [*samples[-1:], machine_busy_seconds() - before]
        busy = sum(samples) / len(samples)
        quiet = len(samples) == 2 and max(samples) < 0.25
        if quiet or time.monotonic() >= deadline:
            return busy


def code_version() -> str:
    """The commit the server code comes from, and whether src/ differs from it."""

    def git(*command: str) -> str:
        done = subprocess.run(
            ["git", *command], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        return done.stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "src")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    if not head:
        return "unknown (not a git checkout)"
    return f"{head}{' with uncommitted changes in src/' if dirty else ', src/ clean'}"
