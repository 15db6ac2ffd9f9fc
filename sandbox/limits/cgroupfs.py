"""Small helpers shared by the cgroup v1 and v2 modules: reading and writing cgroupfs files."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from pathlib import Path

MIB = 1024 * 1024


def write(path: Path, value: str | int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)


def read(path: Path) -> str:
    with open(path) as f:
        return f.read()


def read_keyed(path: Path) -> dict[str, int]:
    """A flat keyed file (``key value`` per line) as a dict; missing file → empty."""
    values: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in read(path).splitlines():
            key, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                values[key] = int(value)
    return values


def pread_text(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode()


def procs(directory: Path) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(p) for p in read(directory / "cgroup.procs").split()]
    return []


def kill_procs(directory: Path, rounds: int = 20) -> None:
    """SIGKILL every process listed in ``cgroup.procs`` until none is left (or ``rounds``)."""
    for _ in range(rounds):
        pids = procs(directory)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def remove(directory: Path) -> bool:
    """rmdir a cgroup; True when it is gone, False while it still holds (dying) tasks."""
    try:
        os.rmdir(directory)
    except FileNotFoundError:
        return True
    except OSError as exc:
        if exc.errno in (errno.EBUSY, errno.ENOTEMPTY):
            return False
        raise
    return True


def remove_tree(directory: Path) -> bool:
    """Kill and remove a cgroup and its children, deepest first."""
    if not directory.is_dir():
        return True
    gone = True
    for child in sorted((p for p in directory.iterdir() if p.is_dir()), reverse=True):
        gone = remove_tree(child) and gone
    kill_procs(directory)
    return remove(directory) and gone


def mb_ceil(nbytes: int) -> int:
    return -(-nbytes // MIB)
