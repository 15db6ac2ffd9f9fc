"""The few Linux system calls the limits need that Python 3.11 does not wrap (via ctypes)."""

from __future__ import annotations

import ctypes
import os

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 0x1
OPEN_TREE_CLOEXEC = 0o2000000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
SYS_OPEN_TREE = 428  # the same number on every architecture (generic syscall table)
SYS_MOVE_MOUNT = 429

_libc: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        try:  # find_library runs ldconfig in a subprocess: only when the usual name fails
            _libc = ctypes.CDLL("libc.so.6", use_errno=True)
        except OSError:
            from ctypes import util

            _libc = ctypes.CDLL(util.find_library("c"), use_errno=True)
    return _libc


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def unshare(flags: int) -> None:
    _check(libc().unshare(ctypes.c_int(flags)), "unshare")


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(libc().mount(source.encode(), target.encode(),
                        fstype.encode() if fstype else None, ctypes.c_ulong(flags),
                        data.encode() if data else None), f"mount {target}")


def make_mounts_private() -> None:
    """Keep the mounts made in this namespace from propagating back to the host."""
    mount("none", "/", None, MS_REC | MS_PRIVATE)


def clone_tree(path: str) -> int:
    """A detached copy of the mount tree at ``path`` (open_tree, Linux 5.2+)."""
    fn = libc().syscall
    fn.restype = ctypes.c_long
    return _check(fn(ctypes.c_long(SYS_OPEN_TREE), ctypes.c_int(AT_FDCWD), path.encode(),
                     ctypes.c_uint(OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE)),
                  f"open_tree {path}")


def attach_tree(fd: int, target: str) -> None:
    """Attach a tree from ``clone_tree`` at ``target`` (move_mount)."""
    fn = libc().syscall
    fn.restype = ctypes.c_long
    _check(fn(ctypes.c_long(SYS_MOVE_MOUNT), ctypes.c_int(fd), b"", ctypes.c_int(AT_FDCWD),
              target.encode(), ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH)), f"move_mount {target}")
