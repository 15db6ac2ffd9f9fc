"""Run inside a fresh worker, as root, before any user code: enter the execution role.

The limiter passes a JSON spec in ``FLOWRUN_ENTER``; the worker calls ``apply`` right after
start-up. In order: new mount (and, for ``network: none|loopback``, network) namespace;
mounts made private; the folders the worker needs exposed for its user; the state folder
covered; the private scratch tmpfs mounted; loopback brought up; the user dropped. After
the drop the process is no longer dumpable, so other workers cannot read its
``/proc/<pid>/environ`` either.
"""

from __future__ import annotations

import sys
from typing import Any

from sandbox.limits import network, scratch, syscalls, user


def apply(spec: dict[str, Any]) -> None:
    mode = spec.get("network", "full")
    try:
        syscalls.unshare(syscalls.CLONE_NEWNS | network.unshare_flags(mode))
        syscalls.make_mounts_private()
    except OSError as exc:
        if network.needs_namespace(mode):
            raise  # a `network: none` function never runs with the host's network
        print(f"flowrun: no mount namespace for this worker, running without its role: {exc}",
              file=sys.__stderr__)
        return
    account = user.Account(**spec["user"]) if spec.get("user") else None
    uid, gid = (account.uid, account.gid) if account else (0, 0)
    if account is not None:
        try:
            user.expose(user.needed_paths(spec.get("expose", [])), uid, gid)
        except OSError as exc:
            print(f"flowrun: cannot expose the worker's folders to {account.name}, "
                  f"staying root: {exc}", file=sys.__stderr__)
            account, uid, gid = None, 0, 0
    if spec.get("state_dir"):
        scratch.cover_state_dir(spec["state_dir"])
    if spec.get("scratch"):
        scratch.mount_scratch(spec["scratch"], int(spec["scratch_mb"]), uid, gid)
    network.enter(mode)
    if account is not None:
        user.drop(account)
