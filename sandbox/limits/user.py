"""``permissions.user``: the unprivileged account a worker runs as (root daemons only).

The default is a dedicated ``flowrun`` account when the host has one (``useradd --system
flowrun``, then give it the folders its functions read and write). Without one, the worker
keeps the daemon's identity — a function reading a trigger's input file or writing an
outbox folder owned by root would otherwise break on upgrade — and ``flowrun status``
says so; set ``permissions.user: nobody`` to drop anyway. ``user: root`` keeps the
daemon's identity explicitly. Dropping to another user must not cost the
worker its interpreter or its code: folders it needs (the Python installation, the code
folder, the sandbox package) but cannot reach as that user — say under a 0700 ``/root`` or a
test's private temp folder — are exposed inside the worker's private mount namespace, under
an otherwise empty tmpfs laid over the unreachable ancestor. Nothing else of that ancestor
becomes visible, and the host's permissions are left untouched.
"""

from __future__ import annotations

import os
import pwd
import stat
import sys
from collections.abc import Iterable
from typing import NamedTuple

from sandbox.limits import syscalls

DEDICATED = "flowrun"
FALLBACK: str | None = None  # "nobody" would drop every function by default
COVER_OPTIONS = "size=1m,mode=0755"


class Account(NamedTuple):  # a NamedTuple: dataclasses costs the worker ~10 ms to import
    name: str
    uid: int
    gid: int


def resolve(name: str | None) -> Account | None:
    """The account to run as, or None to keep the daemon's (``root``, or unknown default)."""
    candidates = [name] if name else [c for c in (DEDICATED, FALLBACK) if c]
    for candidate in candidates:
        try:
            entry = pwd.getpwnam(candidate) if not candidate.isdigit() else pwd.getpwuid(int(candidate))
        except KeyError:
            continue
        if entry.pw_uid == 0:
            return None
        return Account(entry.pw_name, entry.pw_uid, entry.pw_gid)
    if name:
        raise LookupError(f"permissions.user: no such user {name!r} on this host")
    return None


def _may_traverse(st: os.stat_result, uid: int, gid: int) -> bool:
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == gid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def unreachable_ancestor(path: str, uid: int, gid: int) -> str | None:
    """The topmost folder on the way to ``path`` that ``uid`` may not pass, or None."""
    parts = ["/", *[p for p in path.split("/") if p]]
    for depth in range(1, len(parts)):
        folder = os.path.join(*parts[:depth])
        try:
            if not _may_traverse(os.stat(folder), uid, gid):
                return folder
        except OSError:
            return None
    return None


def needed_paths(extra: Iterable[str]) -> list[str]:
    """Folders a Python worker reads: its installation, its import path and ``extra``."""
    found = [sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(sys.executable),
             *sys.path, *extra]
    unique = sorted({os.path.realpath(p) for p in found if p and os.path.isdir(p)})
    outermost: list[str] = []
    for path in unique:
        if not any(path == kept or path.startswith(kept.rstrip("/") + "/") for kept in outermost):
            outermost.append(path)
    return outermost


def expose(paths: Iterable[str], uid: int, gid: int) -> list[str]:
    """Make ``paths`` reachable for ``uid`` inside this (private) mount namespace.

    Returns the ancestors that were covered. Must run as root after ``unshare(CLONE_NEWNS)``.
    """
    by_ancestor: dict[str, list[str]] = {}
    for path in paths:
        ancestor = unreachable_ancestor(path, uid, gid)
        if ancestor is not None:
            by_ancestor.setdefault(ancestor, []).append(path)
    for ancestor, inside in by_ancestor.items():
        trees = [(path, syscalls.clone_tree(path)) for path in inside]
        syscalls.mount("tmpfs", ancestor, "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NODEV,
                       COVER_OPTIONS)
        for path, fd in trees:
            os.makedirs(path, mode=0o755, exist_ok=True)
            try:
                syscalls.attach_tree(fd, path)
            finally:
                os.close(fd)
    return list(by_ancestor)


def drop(account: Account) -> None:
    """Become ``account`` for good: no supplementary groups, then gid, then uid."""
    os.setgroups([])
    os.setgid(account.gid)
    os.setuid(account.uid)
