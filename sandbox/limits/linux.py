"""``LinuxLimiter``: cgroups, namespaces, another user and rlimits — whatever the host allows.

Per worker: a cgroup per usable controller (memory hard limit with swap off, a CPU quota
following memory, a pids cap), rlimits (open files, file size, core dumps; address space
and processes where no cgroup can), and — when the daemon is root — a private mount
namespace with the scratch tmpfs, the state folder hidden, a network namespace for
``network: none|loopback`` and an unprivileged user. ``describe()`` says which limit is
enforced by what, for ``flowrun status``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sandbox.isolation import NullPlacement, Placement
from sandbox.limits import cgroupfs, rlimits, scratch, user
from sandbox.limits.cgroups import (
    CPU_PERIOD_US,
    MB_PER_CPU,
    UNIFIED,
    CgroupTree,
    WorkerCgroups,
    WorkerLimits,
    cpu_share,
    quota_us,
)
from sandbox.limits.detect import CONTROLLERS, Host, detect
from sandbox.limits.loopback_bpf import LoopbackOnly

log = logging.getLogger("flowrun.limits")

AS_HEADROOM_MB = 1024  # address space is not memory: leave room for mappings and arenas
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def _kernel_at_least(major: int, minor: int) -> bool:
    try:
        numbers = platform.release().split("-")[0].split(".")
        return (int(numbers[0]), int(numbers[1])) >= (major, minor)
    except (ValueError, IndexError):
        return False


def _user_processes(uid: int) -> int:
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    count += 1
            except OSError:
                pass
    return count


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip("/") + "/")


class LinuxLimiter:
    """The limiter flowrun uses on Linux (see ``sandbox.limits.detect.default_limiter``)."""

    def __init__(self, host: Host | None = None, *, create: bool = True,
                 make_dir: Callable[[Path], None] | None = None) -> None:
        self.host = host or detect()
        self.privileged = self.host.privileged
        hierarchies = (*CONTROLLERS, UNIFIED) if self.privileged else CONTROLLERS
        self.tree = CgroupTree(self.host, hierarchies, make_dir=make_dir)
        if create:
            self.tree.prepare()
        self._loopback: LoopbackOnly | None | bool = False  # False: not tried yet
        self._own_processes: int | None = None
        self._secured: set[str] = set()

    # ---------------------------------------------------------------- what applies

    def _has(self, controller: str) -> bool:
        return controller in self.tree.controllers

    def limits_for(self, settings: Mapping[str, Any]) -> WorkerLimits:
        memory_mb = int(settings.get("memory_mb", 128))
        share = cpu_share(memory_mb, settings.get("cpus"))
        return WorkerLimits(
            memory_bytes=memory_mb * cgroupfs.MIB,
            cpu_quota_us=quota_us(share),
            cpu_period_us=CPU_PERIOD_US,
            pids_max=int(settings.get("pids_max", 256)),
            init_quota_us=quota_us(max(share, 1.0)),
        )

    def loopback_filter(self) -> LoopbackOnly | None:
        """The BPF programs keeping ``network: loopback`` on 127.0.0.1, if this host can."""
        if self._loopback is False:
            self._loopback = None
            if self.privileged and UNIFIED in self.tree.controllers:
                try:
                    self._loopback = LoopbackOnly()
                except OSError as exc:
                    log.warning("network: loopback falls back to a namespace of its own: %s", exc)
        return self._loopback if isinstance(self._loopback, LoopbackOnly) else None

    @staticmethod
    def network_mode(settings: Mapping[str, Any]) -> str:
        return str((settings.get("permissions") or {}).get("network", "full"))

    def account_for(self, settings: Mapping[str, Any]) -> user.Account | None:
        if not self.privileged:
            return None
        permissions = settings.get("permissions") or {}
        return user.resolve(permissions.get("user"))

    # ---------------------------------------------------------------- Limiter

    def placement(self, function: str, worker_id: str, settings: Mapping[str, Any]) -> Placement:
        if not self.tree.controllers:
            return NullPlacement()
        attach = None
        if self.network_mode(settings) == "loopback":
            loopback = self.loopback_filter()
            if loopback is not None:
                def attach(directory: Path, programs: LoopbackOnly = loopback) -> None:
                    programs.attach(str(directory))
        return WorkerCgroups(self.tree, worker_id, self.limits_for(settings), attach)

    def rlimits(self, settings: Mapping[str, Any]) -> dict[str, int]:
        storage_mb = int(settings.get("ephemeral_storage_mb", 512))
        fsize = rlimits.FSIZE_BYTES if self.privileged else scratch.fsize_bytes(storage_mb)
        limits = rlimits.defaults(fsize)
        if not self._has("memory"):
            limits["as"] = (int(settings.get("memory_mb", 128)) + AS_HEADROOM_MB) * cgroupfs.MIB
        if not self._has("pids"):
            if self._own_processes is None:
                self._own_processes = _user_processes(os.getuid())
            limits["nproc"] = self._own_processes + int(settings.get("pids_max", 256))
        return limits

    def command_prefix(self, settings: Mapping[str, Any]) -> Sequence[str]:
        return ()

    def worker_environment(self, settings: Mapping[str, Any]) -> dict[str, str]:
        """``FLOWRUN_ENTER`` for the worker: the namespaces, mounts and user to enter."""
        if not self.privileged:
            return {}
        account = self.account_for(settings)
        state_dir = settings.get("state_dir")
        code = settings.get("code")
        if state_dir and code and _inside(str(code), str(state_dir)):
            log.warning("code folder %s is inside the state folder: not hiding %s", code, state_dir)
            state_dir = None
        if state_dir and state_dir not in self._secured:
            os.chmod(state_dir, 0o700)
            self._secured.add(state_dir)
        network = self.network_mode(settings)
        if network == "loopback" and self.loopback_filter() is not None:
            network = "full"  # the host's network, with BPF refusing all but 127.0.0.1 / ::1
        spec = {
            "network": network,
            "user": account._asdict() if account else None,
            "expose": [str(p) for p in (code, PACKAGE_ROOT, state_dir) if p],
            "state_dir": state_dir,
            "scratch": settings.get("tmp_dir"),
            "scratch_mb": int(settings.get("ephemeral_storage_mb", 512)),
        }
        return {"FLOWRUN_ENTER": json.dumps(spec)}

    def describe_function(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        """One function's limits as this host enforces them (a line of ``flowrun status``)."""
        limits = self.limits_for(settings)
        described: dict[str, Any] = {
            "cpus": round(limits.cpu_quota_us / limits.cpu_period_us, 3) if self._has("cpu")
            else "unlimited",
            "pids_max": limits.pids_max,
        }
        if self.privileged:
            account = self.account_for(settings)
            described["user"] = account.name if account else "root"
            described["network"] = self.network_mode(settings)
            described["scratch_mb"] = int(settings.get("ephemeral_storage_mb", 512))
        return described

    def describe(self) -> dict[str, Any]:
        return {**self._describe_cgroups(), **self._describe_role(),
                "nofile": f"rlimit {rlimits.NOFILE}", "core": "rlimit 0 (no core dumps)"}

    def _where(self, controller: str) -> str:
        c = self.tree.controllers[controller]
        return f"cgroup v{c.version} ({c.directory}/flowrun-<pid>/<worker>)"

    def _describe_cgroups(self) -> dict[str, str]:
        d: dict[str, str] = {}
        if self._has("memory"):
            v2 = self.tree.controllers["memory"].version == 2
            files = "memory.max, memory.swap.max=0" if v2 else \
                "memory.limit_in_bytes, memsw = limit, swappiness 0"
            d["memory"] = f"{self._where('memory')}: {files}"
            d["oom"] = "memory.events oom_kill" if v2 else "memory.oom_control oom_kill"
            if not v2:
                d["max_memory_used"] = "memory.max_usage_in_bytes, reset by the worker between invocations"
            elif _kernel_at_least(6, 12):
                d["max_memory_used"] = "memory.peak, reset by the worker between invocations"
            else:
                d["max_memory_used"] = ("worker process peak RSS per invocation (this kernel "
                                        "cannot reset memory.peak)")
        else:
            d["memory"] = f"rlimit AS at memory_mb + {AS_HEADROOM_MB} MB (no memory cgroup)"
            d["oom"] = "not detected (no memory cgroup)"
            d["max_memory_used"] = "worker process peak RSS per invocation"
        if self._has("cpu"):
            v2 = self.tree.controllers["cpu"].version == 2
            files = "cpu.max" if v2 else "cpu.cfs_quota_us/cpu.cfs_period_us"
            d["cpu"] = (f"{self._where('cpu')}: {files}, memory_mb/{MB_PER_CPU} CPUs unless "
                        "`cpus` is set; init may use one full CPU")
        else:
            d["cpu"] = "not enforced (no cpu cgroup)"
        if self._has("cpuacct"):
            v2 = self.tree.controllers["cpuacct"].version == 2
            d["cpu_accounting"] = f"{self._where('cpuacct')}: " + \
                ("cpu.stat usage_usec" if v2 else "cpuacct.usage")
        if self._has("pids"):
            d["pids"] = f"{self._where('pids')}: pids.max = pids_max"
        else:
            d["pids"] = "rlimit NPROC (counts every process of the worker's user)"
        return d

    def _describe_role(self) -> dict[str, str]:
        if not self.privileged:
            return {"network": "not enforced (needs root with CAP_SYS_ADMIN)",
                    "user": "the daemon's own (switching needs root with CAP_SYS_ADMIN)",
                    "fsize": "rlimit FSIZE = ephemeral_storage_mb per file",
                    "scratch": "TMPDIR folder, files capped by RLIMIT_FSIZE (no tmpfs without root)",
                    "state_dir": "readable by workers (same user)"}
        default = user.resolve(None)
        return {
            "network": "permissions.network, default full (the host's network); "
                       "none: empty network namespace; loopback: " + (
                "the host's 127.0.0.1/::1 only (cgroup BPF connect/sendmsg filter)"
                if self.loopback_filter() is not None else
                "a network namespace with its own loopback (no cgroup2 for BPF)"),
            "user": "permissions.user, default " + (
                default.name if default else
                "the daemon's own (no dedicated 'flowrun' user on this host)"),
            "fsize": f"rlimit {rlimits.FSIZE_BYTES // cgroupfs.MIB} MB per file",
            "scratch": "private tmpfs of ephemeral_storage_mb per worker (mount namespace)",
            "state_dir": "hidden from workers (empty tmpfs over it in their mount namespace)",
        }

