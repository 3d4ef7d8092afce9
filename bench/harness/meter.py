"""CPU of a run's processes and of the whole machine over one measured window.

Other processes on a shared 2-core machine skew every figure, so each report says how
busy the rest of the machine was, and which processes were busiest.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

from harness.machine import (
    cpu_seconds,
    kernel_irq_seconds,
    machine_busy_seconds,
    process_cpu,
    quiet_machine,
    rss_mib,
    top_outsiders,
)
from harness.postgres import backend_pids
from harness.server import Server


@dataclass
class Load:
    cpu: dict[str, float]  # share of one core, per process of this run
    machine: float  # cores busy, whole machine
    before: float  # cores busy just before the measurement
    outsiders: str
    rss: dict[str, float]  # MiB, per server
    irq: float = 0.0  # cores in kernel irq/softirq (not charged to any process)
    running: float = 0.0  # cores used by other processes still running at the end

    @property
    def others(self) -> float:
        """Cores busy outside this run's processes."""
        return max(0.0, self.machine - sum(self.cpu.values()))

    def lines(self) -> list[str]:
        cpu = "  ".join(f"{name} {share:.0%}" for name, share in self.cpu.items())
        rss = ", ".join(f"{name} {mib:.0f} MiB" for name, mib in self.rss.items())
        return [
            f"cpu (share of one core):  {cpu}; RSS {rss}",
            f"machine (all processes):  {self.machine:.2f} of {os.cpu_count()} cores busy, "
            f"{self.others:.2f} of them outside this benchmark (other load); "
            f"{self.before:.2f} busy just before",
            f"other load, split:        {self.running:.2f} in other processes still running "
            f"at the end, {self.irq:.2f} kernel irq/softirq (this benchmark's loopback traffic "
            f"included), {max(0.0, self.others - self.running - self.irq):.2f} in processes "
            "that ended during the window",
            f"busiest other processes:  {self.outsiders or '-'}",
        ]

    def text(self) -> str:
        """The same on one line."""
        cpu = ", ".join(f"{name} {share:.0%}" for name, share in self.cpu.items())
        one, five, _ = os.getloadavg()
        return (
            f"cpu (share of one core): {cpu}; other load {self.others:.2f} cores "
            f"({self.before:.2f} busy just before; {self.irq:.2f} of it kernel irq/softirq, "
            f"loopback traffic included); load average {one:.2f} / {five:.2f}; busiest other "
            f"processes: {self.outsiders or '-'}"
        )


class Meter:
    """`start()`, the measured work, `stop()`: the Load over that window. The PostgreSQL
    backends serving `database` count as the process "postgres"."""

    def __init__(self, pids: dict[str, int], database: str | None, servers: Sequence[Server]):
        self.pids = pids
        self.database = database
        self.servers = servers
        self.before = 0.0

    async def start(self, wait_quiet: float | None) -> None:
        """Begin the window; first measure (and wait for) an idle machine unless None."""
        if wait_quiet is not None:
            self.before = await quiet_machine(wait_quiet)
        self.pg_pids = await backend_pids(self.database) if self.database else []
        self.cpu0 = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self.pg0 = {pid: cpu_seconds(pid) for pid in self.pg_pids}
        self.everyone0 = process_cpu()
        self.machine0 = machine_busy_seconds()
        self.irq0 = kernel_irq_seconds()
        self.t0 = time.monotonic()

    async def stop(self) -> Load:
        elapsed = max(1e-9, time.monotonic() - self.t0)
        cpu = {
            name: (cpu_seconds(pid) - self.cpu0[name]) / elapsed for name, pid in self.pids.items()
        }
        machine = (machine_busy_seconds() - self.machine0) / elapsed
        irq = (kernel_irq_seconds() - self.irq0) / elapsed
        pg_pids = self.pg_pids
        if self.database:
            # Backends the pools opened during the window count from zero.
            pg_pids = sorted({*pg_pids, *await backend_pids(self.database)})
            used = sum(cpu_seconds(pid) - self.pg0.get(pid, 0.0) for pid in pg_pids)
            cpu["postgres"] = used / elapsed
        ours = {*self.pids.values(), *pg_pids}
        everyone = process_cpu()
        outsiders = top_outsiders(self.everyone0, everyone, ours, elapsed)
        running = sum(
            used - self.everyone0.get(pid, (name, 0.0))[1]
            for pid, (name, used) in everyone.items()
            if pid not in ours
        )
        rss = {s.name: rss_mib(s.pid) for s in self.servers}
        return Load(cpu, machine, self.before, outsiders, rss, irq, running / elapsed)
