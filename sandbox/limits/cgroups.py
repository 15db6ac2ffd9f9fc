"""flowrun's own cgroup subtree and one cgroup per worker, across v1, v2 and hybrid hosts.

Under our current cgroup of every usable controller, flowrun makes ``flowrun-<pid>`` and,
in it, one cgroup per worker (``<function>-<n>``). Controllers that share a directory (v2,
or co-mounted v1 ``cpu,cpuacct``) share one cgroup. Leftovers of daemons that died without
cleaning up are removed when a tree is prepared.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from sandbox.limits import cgroup_v1, cgroup_v2, cgroupfs
from sandbox.limits.detect import Controller, Host

log = logging.getLogger("flowrun.limits")

CPU_PERIOD_US = 100_000
MB_PER_CPU = 1769  # as on Lambda: 1,769 MB of memory buys one full vCPU
MIN_QUOTA_US = 1000  # the kernel's floor for a CFS quota
_BASE = re.compile(r"^flowrun-(\d+)$")
RETRY_S, RETRIES = 0.02, 250  # removal of a cgroup whose last tasks are still exiting
UNIFIED = "unified"  # the cgroup2 hierarchy itself, even with no controller of ours in it


def version_module(version: int) -> ModuleType:
    return cgroup_v2 if version == 2 else cgroup_v1


def cpu_share(memory_mb: int, cpus: float | None) -> float:
    """CPUs a worker may use: ``cpus`` when set, else proportional to memory as on Lambda."""
    return float(cpus) if cpus else memory_mb / MB_PER_CPU


def quota_us(share: float, period_us: int = CPU_PERIOD_US) -> int:
    return max(MIN_QUOTA_US, round(share * period_us))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _make_dir(directory: Path) -> None:
    """mkdir a cgroup (the kernel fills in its files); a fake cgroupfs swaps this out."""
    directory.mkdir(exist_ok=True)


@dataclass(frozen=True)
class WorkerLimits:
    """What one worker's cgroups enforce."""

    memory_bytes: int
    cpu_quota_us: int
    cpu_period_us: int
    pids_max: int
    init_quota_us: int  # the init phase may use up to one full CPU


class CgroupTree:
    """The ``flowrun-<pid>`` cgroups of this daemon, one per distinct controller directory."""

    def __init__(self, host: Host, controllers: Iterable[str], *, pid: int | None = None,
                 make_dir: Callable[[Path], None] | None = None) -> None:
        self.host = host
        self.make_dir = make_dir or _make_dir
        self.pid = os.getpid() if pid is None else pid
        self.name = f"flowrun-{self.pid}"
        self.controllers: dict[str, Controller] = {}
        for name in controllers:
            controller = host.unified if name == UNIFIED else host.controllers.get(name)
            if controller is not None and host.writable(controller):
                self.controllers[name] = controller
        self._prepared: set[Path] = set()
        self._pending: list[Path] = []
        atexit.register(self._remove_pending_at_exit)

    def base(self, controller: Controller) -> Path:
        return controller.directory / self.name

    def prepare(self) -> None:
        """Create the bases (once), removing leftovers of dead daemons next to them."""
        v2_names = [n for n, c in self.controllers.items()
                    if c.version == 2 and n not in ("cpuacct", UNIFIED)]
        for name, controller in list(self.controllers.items()):
            base = self.base(controller)
            if base in self._prepared:
                continue
            try:
                self.remove_leftovers(controller.directory)
                self.remove_sibling_leftovers(controller)
                if controller.version == 2:
                    cgroup_v2.prepare_parent(controller.directory, base, v2_names, self.pid,
                                             self.make_dir)
                else:
                    self.make_dir(base)
            except OSError as exc:
                log.warning("cgroup %s unusable for %s: %s", base, name, exc)
                del self.controllers[name]
                continue
            self._prepared.add(base)

    def remove_leftovers(self, parent: Path) -> int:
        """Kill and remove ``flowrun-<pid>`` trees whose daemon is gone; returns how many."""
        removed = 0
        with contextlib.suppress(OSError):
            for entry in parent.iterdir():
                match = _BASE.match(entry.name)
                if match is None or not entry.is_dir():
                    continue
                pid = int(match.group(1))
                if pid == self.pid or _alive(pid):
                    continue
                if cgroupfs.remove_tree(entry):
                    removed += 1
        return removed

    def remove_sibling_leftovers(self, controller: Controller) -> int:
        """Leftovers one level over: a daemon that died in a sibling cgroup (a finished
        job's, a restarted service's) left its tree where no daemon of ours will look."""
        if controller.current in ("", "/"):
            return 0
        removed = 0
        with contextlib.suppress(OSError):
            for sibling in controller.directory.parent.iterdir():
                if sibling.is_dir() and sibling != controller.directory \
                        and _BASE.match(sibling.name) is None:
                    removed += self.remove_leftovers(sibling)
        return removed

    def directories(self, worker_id: str, unified: bool = False) -> dict[str, tuple[int, Path]]:
        """Controller → (version, directory) of one worker's cgroups; the controller-less
        cgroup2 one (for BPF programs) only when ``unified``."""
        return {name: (c.version, self.base(c) / worker_id) for name, c in self.controllers.items()
                if unified or name != UNIFIED}

    def remove_later(self, directory: Path) -> None:
        """rmdir once the kernel has let the dying tasks go: retried on the event loop (if
        one runs), on every placement and release, and at exit."""
        self._pending.append(directory)
        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop().call_later(RETRY_S, self._retry_soon, RETRIES)

    def _retry_soon(self, left: int) -> None:
        self.retry_pending()
        if self._pending and left > 1:
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().call_later(RETRY_S, self._retry_soon, left - 1)

    def retry_pending(self) -> None:
        self._pending = [d for d in self._pending if not cgroupfs.remove(d)]

    def _remove_pending_at_exit(self) -> None:
        for _ in range(50):
            self.retry_pending()
            if not self._pending:
                break
            time.sleep(0.02)
        for base in self._prepared:
            with contextlib.suppress(OSError):
                os.rmdir(base)


class WorkerCgroups:
    """The ``Placement`` of one worker: its cgroups, limits, counters and clean-up."""

    def __init__(self, tree: CgroupTree, worker_id: str, limits: WorkerLimits,
                 attach: Callable[[Path], None] | None = None) -> None:
        """``attach``: called with the worker's cgroup2 directory (e.g. to attach BPF
        programs) before any process joins it."""
        self.tree = tree
        self.limits = limits
        tree.retry_pending()
        tree.prepare()
        by_controller = tree.directories(worker_id, unified=attach is not None)
        self.dirs: dict[Path, int] = {}  # each distinct directory once, with its version
        for version, directory in by_controller.values():
            self.dirs[directory] = version
        self.memory = by_controller.get("memory")
        self.cpu = by_controller.get("cpu")
        self.cpuacct = by_controller.get("cpuacct")
        self.pids = by_controller.get("pids")
        self._peak_fd = -1
        self._cpu_fd = -1
        self._peak_resettable = False
        self._quota_applied = False
        try:
            self._create()
            if attach is not None:
                unified = by_controller.get(UNIFIED)
                if unified is None:
                    raise OSError("no cgroup2 directory to attach to")
                attach(unified[1])
        except BaseException:
            self.release()
            raise

    def _create(self) -> None:
        for directory in self.dirs:
            self.tree.make_dir(directory)
        if self.memory is not None:
            version, directory = self.memory
            version_module(version).set_memory(directory, self.limits.memory_bytes)
            with contextlib.suppress(OSError):
                self._peak_fd = version_module(version).open_peak(directory)
        if self.cpu is not None:
            version, directory = self.cpu
            version_module(version).set_cpu(directory, self.limits.init_quota_us,
                                            self.limits.cpu_period_us)
        if self.pids is not None:
            version, directory = self.pids
            version_module(version).set_pids(directory, self.limits.pids_max)
        if self.cpuacct is not None:
            version, directory = self.cpuacct
            with contextlib.suppress(OSError):
                self._cpu_fd = version_module(version).open_cpu_usage(directory)

    # ---------------------------------------------------------------- Placement

    def place(self, pid: int) -> None:
        for directory in self.dirs:
            cgroupfs.write(directory / "cgroup.procs", pid)

    def peak_counter(self) -> tuple[int, bytes] | None:
        """A descriptor on this cgroup's peak memory counter and the bytes that reset it,
        for the worker to inherit: it resets the peak after each reply (off the invocation's
        path) and reads it after each handler. None without a memory cgroup or when this
        kernel cannot reset the peak (cgroup v2 before Linux 6.12)."""
        if self._peak_fd < 0 or self.memory is None:
            return None
        module = version_module(self.memory[0])
        self._peak_resettable = bool(module.reset_peak(self._peak_fd))
        return (self._peak_fd, module.PEAK_RESET) if self._peak_resettable else None

    def before_invoke(self) -> None:
        """The first invocation ends the init phase: the CPU quota drops from the init
        burst to the function's share. Later calls cost one attribute test."""
        if not self._quota_applied and self.cpu is not None:
            version, directory = self.cpu
            version_module(version).set_cpu(directory, self.limits.cpu_quota_us,
                                            self.limits.cpu_period_us)
            self._quota_applied = True

    def peak_memory_mb(self) -> int | None:
        """The peak since the worker last reset it (this invocation's, when the worker died
        or timed out in it); after an OOM kill without a resettable peak, the lifetime peak
        (which is then the limit); otherwise None."""
        if self.memory is None or self._peak_fd < 0:
            return None
        module = version_module(self.memory[0])
        try:
            if self._peak_resettable:
                return cgroupfs.mb_ceil(module.read_peak_bytes(self._peak_fd))
            if self.oom_killed():
                return cgroupfs.mb_ceil(module.lifetime_peak_bytes(self.memory[1]))
        except (OSError, ValueError):
            return None
        return None

    def cpu_usage_ms(self) -> float | None:
        """CPU time of the worker's cgroup (all its processes) since it was made."""
        if self._cpu_fd < 0 or self.cpuacct is None:
            return None
        try:
            return float(version_module(self.cpuacct[0]).read_cpu_usage_ms(self._cpu_fd))
        except (OSError, ValueError):
            return None

    def oom_killed(self) -> bool:
        if self.memory is None:
            return False
        version, directory = self.memory
        try:
            return int(version_module(version).oom_kills(directory)) > 0
        except (OSError, ValueError):
            return False

    def kill_all(self) -> None:
        for directory, version in self.dirs.items():
            with contextlib.suppress(OSError):
                version_module(version).kill_all(directory)

    def release(self) -> None:
        for fd in (self._peak_fd, self._cpu_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._peak_fd = self._cpu_fd = -1
        for directory in self.dirs:
            try:
                if not cgroupfs.remove(directory):
                    self.tree.remove_later(directory)
            except OSError as exc:
                log.warning("could not remove cgroup %s: %s", directory, exc)
        self.dirs = {}
