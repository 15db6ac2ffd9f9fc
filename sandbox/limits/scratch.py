"""The function's writable scratch folder (``TMPDIR``), private and ``ephemeral_storage_mb`` big.

When privileged, each worker gets its own tmpfs of that size mounted on the folder inside
a private mount namespace, owned by the user the worker runs as; nobody else sees it, and
writing past its size fails with ENOSPC. The daemon's state folder around it is covered by
an empty, unlistable tmpfs in the same namespace, so the ledger, the logs and other
functions' folders are out of sight. Tmpfs pages count towards the worker's memory cgroup.
Unprivileged, the folder is the plain directory and RLIMIT_FSIZE caps each file instead.
"""

from __future__ import annotations

import os

from sandbox.limits import syscalls

MIB = 1024 * 1024
COVER_OPTIONS = "size=1m,mode=0711"


def cover_state_dir(state_dir: str) -> None:
    """Hide everything in ``state_dir`` behind an empty root-owned tmpfs (mode 0711)."""
    os.makedirs(state_dir, exist_ok=True)
    syscalls.mount("tmpfs", state_dir, "tmpfs",
                   syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC, COVER_OPTIONS)


def mount_scratch(path: str, size_mb: int, uid: int, gid: int) -> None:
    os.makedirs(path, mode=0o711, exist_ok=True)
    syscalls.mount("tmpfs", path, "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NODEV,
                   f"size={size_mb}m,mode=0700,uid={uid},gid={gid}")


def fsize_bytes(size_mb: int) -> int:
    """The per-file cap used when no tmpfs can be mounted."""
    return size_mb * MIB
