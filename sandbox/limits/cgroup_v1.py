"""cgroup v1: one hierarchy per controller (memory, cpu, cpuacct, pids), one file per knob."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from sandbox.limits import cgroupfs

UNLIMITED_QUOTA = -1


def set_memory(directory: Path, limit_bytes: int) -> None:
    """Hard limit at ``limit_bytes`` with swap off: memsw equal to the limit, swappiness 0."""
    cgroupfs.write(directory / "memory.limit_in_bytes", limit_bytes)
    memsw = directory / "memory.memsw.limit_in_bytes"
    if memsw.exists():
        cgroupfs.write(memsw, limit_bytes)
    with contextlib.suppress(OSError):
        cgroupfs.write(directory / "memory.swappiness", 0)


PEAK_RESET = b"0"  # written to the peak file, resets it


def open_peak(directory: Path) -> int:
    return os.open(directory / "memory.max_usage_in_bytes", os.O_RDWR)


def reset_peak(fd: int) -> bool:
    """Writing 0 resets the high-water mark to the current usage."""
    try:
        os.pwrite(fd, PEAK_RESET, 0)
    except OSError:
        return False
    return True


def read_peak_bytes(fd: int) -> int:
    return int(cgroupfs.pread_text(fd))


def lifetime_peak_bytes(directory: Path) -> int:
    return int(cgroupfs.read(directory / "memory.max_usage_in_bytes"))


def oom_kills(directory: Path) -> int:
    """The memory cgroup's own OOM-kill counter (``oom_kill`` in memory.oom_control).

    Kernels before 4.13 have no such line; ``under_oom`` and ``memory.failcnt`` are the
    best evidence there.
    """
    control = cgroupfs.read_keyed(directory / "memory.oom_control")
    if "oom_kill" in control:
        return control["oom_kill"]
    return control.get("under_oom", 0)


def set_cpu(directory: Path, quota_us: int, period_us: int) -> None:
    cgroupfs.write(directory / "cpu.cfs_period_us", period_us)
    cgroupfs.write(directory / "cpu.cfs_quota_us", quota_us)


def open_cpu_usage(directory: Path) -> int:
    return os.open(directory / "cpuacct.usage", os.O_RDONLY)


def read_cpu_usage_ms(fd: int) -> float:
    return int(cgroupfs.pread_text(fd)) / 1e6  # nanoseconds


def set_pids(directory: Path, pids_max: int) -> None:
    cgroupfs.write(directory / "pids.max", pids_max)


def kill_all(directory: Path) -> None:
    cgroupfs.kill_procs(directory)
