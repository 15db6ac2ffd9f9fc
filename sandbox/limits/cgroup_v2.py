"""cgroup v2 (unified): one directory per cgroup holding every enabled controller's files.

The no-internal-processes rule applies: a cgroup that hands controllers to its children
(``cgroup.subtree_control``) may hold no processes itself, so ``prepare_parent`` moves the
daemon into a leaf of its own when its current cgroup refuses.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from sandbox.limits import cgroupfs

DAEMON_LEAF = "daemon"


def controllers(directory: Path) -> set[str]:
    with contextlib.suppress(OSError):
        return set(cgroupfs.read(directory / "cgroup.controllers").split())
    return set()


def enable(directory: Path, names: Iterable[str]) -> None:
    """Hand ``names`` to the children of ``directory`` (``+memory +cpu`` ...)."""
    wanted = [n for n in names if n]
    if not wanted:
        return
    with contextlib.suppress(OSError):
        current = set(cgroupfs.read(directory / "cgroup.subtree_control").split())
        wanted = [n for n in wanted if n not in current]
    if wanted:
        cgroupfs.write(directory / "cgroup.subtree_control", " ".join(f"+{n}" for n in wanted))


def prepare_parent(parent: Path, base: Path, names: Iterable[str], pid: int,
                   make_dir: Callable[[Path], None]) -> None:
    """Make ``base`` (a child of ``parent``, our cgroup) able to give ``names`` to workers.

    Enabling controllers in ``parent`` fails with EBUSY while it holds processes; then the
    daemon moves to ``base/daemon`` and the enable is retried.
    """
    names = [n for n in names if n in controllers(parent)]
    make_dir(base)
    try:
        enable(parent, names)
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        leaf = base / DAEMON_LEAF
        make_dir(leaf)
        cgroupfs.write(leaf / "cgroup.procs", pid)
        enable(parent, names)
    enable(base, names)


def set_memory(directory: Path, limit_bytes: int) -> None:
    """Hard limit with swap off; an OOM kills the whole group, not one process of it."""
    cgroupfs.write(directory / "memory.max", limit_bytes)
    swap = directory / "memory.swap.max"
    if swap.exists():
        cgroupfs.write(swap, 0)
    oom_group = directory / "memory.oom.group"
    if oom_group.exists():
        cgroupfs.write(oom_group, 1)


PEAK_RESET = b"reset\n"  # written to the peak file, resets it


def open_peak(directory: Path) -> int:
    return os.open(directory / "memory.peak", os.O_RDWR)


def reset_peak(fd: int) -> bool:
    """Linux 6.12+: writing to memory.peak resets the peak seen through this descriptor."""
    try:
        os.pwrite(fd, PEAK_RESET, 0)
    except OSError:
        return False
    return True


def read_peak_bytes(fd: int) -> int:
    return int(cgroupfs.pread_text(fd))


def lifetime_peak_bytes(directory: Path) -> int:
    return int(cgroupfs.read(directory / "memory.peak"))


def oom_kills(directory: Path) -> int:
    return cgroupfs.read_keyed(directory / "memory.events").get("oom_kill", 0)


def set_cpu(directory: Path, quota_us: int, period_us: int) -> None:
    quota = "max" if quota_us < 0 else str(quota_us)
    cgroupfs.write(directory / "cpu.max", f"{quota} {period_us}")


def open_cpu_usage(directory: Path) -> int:
    return os.open(directory / "cpu.stat", os.O_RDONLY)


def read_cpu_usage_ms(fd: int) -> float:
    for line in cgroupfs.pread_text(fd).splitlines():
        if line.startswith("usage_usec "):
            return int(line.split()[1]) / 1000
    return 0.0


def set_pids(directory: Path, pids_max: int) -> None:
    cgroupfs.write(directory / "pids.max", pids_max)


def kill_all(directory: Path) -> None:
    """``cgroup.kill`` (Linux 5.14+) kills the group at once; else kill what is listed."""
    kill = directory / "cgroup.kill"
    if kill.exists():
        with contextlib.suppress(OSError):
            cgroupfs.write(kill, 1)
    cgroupfs.kill_procs(directory)
