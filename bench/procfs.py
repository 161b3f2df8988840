"""CPU and memory, read from /proc: a process's CPU seconds and resident memory, the whole machine's CPU split
into processes, interrupts and the hypervisor's steal, and how busy everything outside the bench keeps the cores.
These are the figures the table's "CPU us/req" and "others" columns and the memory lines come from."""

from __future__ import annotations

import os
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
NOISY_CORES = 0.15  # CPU taken by others during a run above which the run is flagged as noisy


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process, in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children(pid: int) -> list[int]:
    """The live child processes of `pid` (a `--workers` supervisor's workers)."""
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def memory_mb(pid: int) -> dict[str, float]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024.0
    return out


def machine_cpu_seconds() -> dict[str, float]:
    """CPU seconds the whole machine spent, over all cores: in processes (user, nice, system), in interrupts
    (mostly loopback networking, charged to no process) and stolen by the hypervisor."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]] + [0] * 10
    return {"tasks": (v[0] + v[1] + v[2]) / CLK_TCK, "irq": (v[5] + v[6]) / CLK_TCK, "steal": v[7] / CLK_TCK}


def others_cores(pids: list[int], seconds: float = 0.5) -> float:
    """Cores used over `seconds` by everything but `pids` (and this process), plus what the hypervisor stole."""
    pids = [*pids, os.getpid()]
    machine, ours, start = machine_cpu_seconds(), sum(cpu_seconds(p) for p in pids), time.monotonic()
    time.sleep(seconds)
    machine_after, ours_after = machine_cpu_seconds(), sum(cpu_seconds(p) for p in pids)
    wall = time.monotonic() - start
    tasks = machine_after["tasks"] - machine["tasks"] - (ours_after - ours)
    return max(0.0, tasks / wall) + (machine_after["steal"] - machine["steal"]) / wall
