"""What this host can enforce: which cgroup version serves each controller, and privileges.

Decided per controller, never once for the whole system: a hybrid host has memory, cpu and
pids on v1 hierarchies next to a (maybe empty) cgroup2 mount. The answer comes from
``/proc/self/mountinfo`` (where each hierarchy is mounted and which controllers it holds)
and ``/proc/self/cgroup`` (where this process sits in each of them). Both paths are
injectable so tests can point them at a fake tree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sandbox.isolation import Limiter

CONTROLLERS = ("memory", "cpu", "cpuacct", "pids")


@dataclass(frozen=True)
class Mount:
    """One cgroup hierarchy mount: version 1 with its controllers, or the unified one."""

    version: int
    root: str  # the hierarchy path mounted here ("/" unless a cgroup namespace hides more)
    target: Path
    controllers: frozenset[str]


@dataclass(frozen=True)
class Controller:
    """Where one controller lives for this process: its version and our current cgroup."""

    name: str
    version: int
    mount: Path
    current: str  # our cgroup inside the hierarchy, e.g. /process_api/29cb...

    @property
    def directory(self) -> Path:
        return self.mount / self.current.lstrip("/")


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n") \
        .replace("\\134", "\\")


def parse_mountinfo(text: str) -> list[Mount]:
    """The cgroup and cgroup2 mounts listed in a mountinfo file."""
    mounts = []
    for line in text.splitlines():
        head, sep, tail = line.partition(" - ")
        if not sep:
            continue
        fields, tail_fields = head.split(), tail.split()
        if len(fields) < 5 or len(tail_fields) < 3:
            continue
        fstype, options = tail_fields[0], tail_fields[2].split(",")
        if fstype == "cgroup2":
            mounts.append(Mount(2, _unescape(fields[3]), Path(_unescape(fields[4])), frozenset()))
        elif fstype == "cgroup":
            names = frozenset(o for o in options if o in CONTROLLERS or o.startswith("name="))
            mounts.append(Mount(1, _unescape(fields[3]), Path(_unescape(fields[4])), names))
    return mounts


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """Controller (or "" for the unified hierarchy) → our cgroup path."""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _hid, names, path = parts
        if names == "":
            paths[""] = path
        for name in names.split(","):
            if name:
                paths[name] = path
    return paths


def _relative(path: str, mount_root: str) -> str:
    """Our cgroup path as seen below a mount whose root is ``mount_root``."""
    if mount_root in ("", "/"):
        return path
    if path == mount_root:
        return "/"
    if path.startswith(mount_root.rstrip("/") + "/"):
        return path[len(mount_root.rstrip("/")):]
    return path


@dataclass(frozen=True)
class Host:
    """This host's cgroup layout, per controller, plus the unified mount if any."""

    controllers: dict[str, Controller]
    unified: Controller | None
    privileged: bool

    def writable(self, controller: Controller) -> bool:
        return os.access(controller.directory, os.W_OK | os.X_OK)


def _v2_controllers(directory: Path) -> frozenset[str]:
    try:
        return frozenset((directory / "cgroup.controllers").read_text().split())
    except OSError:
        return frozenset()


def detect(proc: str | os.PathLike[str] = "/proc/self", *,
           privileged: bool | None = None) -> Host:
    """Find, per controller, the hierarchy serving it and our cgroup in it."""
    proc = Path(proc)
    try:
        mounts = parse_mountinfo((proc / "mountinfo").read_text())
        paths = parse_proc_cgroup((proc / "cgroup").read_text())
    except OSError:
        mounts, paths = [], {}
    found: dict[str, Controller] = {}
    for mount in mounts:
        if mount.version != 1:
            continue
        for name in mount.controllers & set(CONTROLLERS):
            if name in paths and name not in found:
                found[name] = Controller(name, 1, mount.target, _relative(paths[name], mount.root))
    unified = None
    v2 = next((m for m in mounts if m.version == 2), None)
    if v2 is not None and "" in paths:
        unified = Controller("unified", 2, v2.target, _relative(paths[""], v2.root))
        available = _v2_controllers(unified.directory)
        for name in ("memory", "cpu", "pids"):
            if name not in found and name in available:
                found[name] = Controller(name, 2, v2.target, unified.current)
        if "cpuacct" not in found:  # cpu.stat usage_usec exists in every v2 cgroup
            found["cpuacct"] = Controller("cpuacct", 2, v2.target, unified.current)
    if privileged is None:
        privileged = os.geteuid() == 0 and _has_sys_admin(proc)
    return Host(found, unified, privileged)


CAP_SYS_ADMIN = 21


def _has_sys_admin(proc: Path) -> bool:
    """Root in a container often lacks CAP_SYS_ADMIN: no namespaces or mounts there."""
    try:
        for line in (proc / "status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_SYS_ADMIN & 1)
    except (OSError, ValueError):
        pass
    return False


def _controller_text(host: Host, name: str, what: str) -> str:
    controller = host.controllers.get(name)
    if controller is None:
        return ""
    if not host.writable(controller):
        return ""
    return f"cgroup v{controller.version} {what} ({controller.directory})"


def describe_host(proc: str | os.PathLike[str] = "/proc/self") -> dict[str, Any]:
    """Which limits a daemon started now would enforce, and by what (``flowrun status``)."""
    from sandbox.limits.linux import LinuxLimiter

    return LinuxLimiter(host=detect(proc), create=False).describe()


def default_limiter() -> Limiter:
    """The limiter a ``Runtime`` uses unless given one: ``LinuxLimiter`` on Linux.

    It enforces what the host allows (cgroups, namespaces, another user when root) and
    degrades to rlimits otherwise; elsewhere, or with ``FLOWRUN_ISOLATION=off`` in the
    daemon's environment, only the basic rlimits are set (``NoIsolation``).
    """
    import sys

    if not sys.platform.startswith("linux") or os.environ.get("FLOWRUN_ISOLATION") == "off":
        from sandbox.isolation import NoIsolation

        return NoIsolation()
    from sandbox.limits.linux import LinuxLimiter

    return LinuxLimiter(create=False)
