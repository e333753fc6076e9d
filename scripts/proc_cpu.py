"""CPU time of this machine's processes, from /proc (Linux): what a benchmark's figure cost, and where it went.

A throughput on a shared, virtualised machine swings from minute to minute; the CPU each process spent per unit of
work is steadier, and says which process to look at next."""

from __future__ import annotations

import os
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int | str) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User and system time of one process, all its threads (0 once it has ended)."""
    try:
        fields = _stat(pid)
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (a server's signature recovery workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int(_stat(entry.name)[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):  # a process that ended meanwhile
                continue
    return found


def postgres_cpu_seconds() -> float | None:
    """CPU time of the PostgreSQL server's processes (its backends, WAL writer, checkpointer): None where none is
    visible. A backend that ended is counted in the postmaster that reaped it (cutime + cstime)."""
    total, found = 0, False
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "comm").read_text().startswith("postgres"):
                total += sum(int(field) for field in _stat(entry.name)[11:15])
                found = True
        except OSError:
            continue
    return total / TICK if found else None


def machine_seconds() -> tuple[float, float]:
    """(busy, all) CPU seconds of the whole machine since boot, summed over its cores (/proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    return (sum(values) - idle) / TICK, sum(values) / TICK
