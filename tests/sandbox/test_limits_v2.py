"""cgroup v2 code paths: a fake cgroupfs with the kernel's file names and formats, and the
real (controller-less) cgroup2 mount of this host for procs, cpu.stat and cgroup.kill."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sandbox.limits import cgroup_v2
from sandbox.limits.cgroups import CgroupTree, WorkerCgroups
from sandbox.limits.detect import Controller, Host, detect
from sandbox.limits.linux import LinuxLimiter
from sandbox.worker import CgroupPeak

MIB = 1024 * 1024
V2_FILES = {
    "cgroup.procs": "",
    "cgroup.controllers": "cpu memory pids\n",
    "cgroup.subtree_control": "",
    "cgroup.kill": "",
    "memory.max": "max\n",
    "memory.swap.max": "max\n",
    "memory.oom.group": "0\n",
    "memory.peak": "0\n",
    "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n",
    "cpu.max": "max 100000\n",
    "cpu.stat": "usage_usec 0\nuser_usec 0\nsystem_usec 0\nnr_periods 0\n",
    "pids.max": "max\n",
}
SETTINGS = {"memory_mb": 128, "pids_max": 64, "cpus": None}


def fake_cgroup(directory: Path) -> None:
    """What the kernel does on mkdir in a cgroup2 mount: the directory and its files."""
    directory.mkdir(exist_ok=True)
    for name, text in V2_FILES.items():
        if not (directory / name).exists():
            (directory / name).write_text(text)


@pytest.fixture
def fake_v2(tmp_path: Path) -> tuple[Path, LinuxLimiter]:
    root = tmp_path / "cgroup"
    fake_cgroup(root)
    ours = root / "system.slice"
    fake_cgroup(ours)
    controllers = {n: Controller(n, 2, root, "/system.slice")
                   for n in ("memory", "cpu", "pids", "cpuacct")}
    host = Host(controllers, controllers["cpu"], privileged=True)
    return ours, LinuxLimiter(host=host, make_dir=fake_cgroup)


def test_v2_limits_are_written_in_the_kernels_formats(fake_v2):
    ours, limiter = fake_v2
    placement = limiter.placement("echo", "echo-1", SETTINGS)
    worker = ours / f"flowrun-{os.getpid()}" / "echo-1"
    assert (worker / "memory.max").read_text() == str(128 * MIB)
    assert (worker / "memory.swap.max").read_text() == "0"
    assert (worker / "memory.oom.group").read_text() == "1"
    assert (worker / "pids.max").read_text() == "64"
    assert (worker / "cpu.max").read_text() == "100000 100000"  # init: one full CPU
    placement.before_invoke()
    assert (worker / "cpu.max").read_text() == f"{round(128 / 1769 * 100_000)} 100000"
    placement.place(4242)
    assert (worker / "cgroup.procs").read_text() == "4242"


def test_v2_controllers_are_handed_down_through_subtree_control(fake_v2):
    ours, limiter = fake_v2
    limiter.placement("echo", "echo-1", SETTINGS)
    for directory in (ours, ours / f"flowrun-{os.getpid()}"):
        enabled = (directory / "cgroup.subtree_control").read_text().split()
        assert sorted(enabled) == ["+cpu", "+memory", "+pids"]


def test_v2_the_worker_is_handed_the_peak_counter_that_reset_writes_to(fake_v2):
    ours, limiter = fake_v2
    placement = limiter.placement("echo", "echo-1", SETTINGS)
    peak = ours / f"flowrun-{os.getpid()}" / "echo-1" / "memory.peak"
    counter = placement.peak_counter()
    assert counter is not None
    fd, reset = counter
    assert (reset, peak.read_text()) == (b"reset\n", "reset\n")  # probed: resettable
    probe = CgroupPeak(fd, reset)  # what the worker does with it
    peak.write_text(f"{50 * MIB}\n")  # the kernel's peak since the reset
    assert probe.peak_kb() == 50 * 1024
    assert placement.peak_memory_mb() == 50  # the daemon's view after a death
    probe.reset()
    assert peak.read_text().startswith("reset\n")


def test_v2_an_oom_kill_is_read_from_memory_events_with_the_peak_at_the_limit(fake_v2):
    ours, limiter = fake_v2
    placement = limiter.placement("hog", "hog-1", SETTINGS)
    worker = ours / f"flowrun-{os.getpid()}" / "hog-1"
    placement.before_invoke()
    assert not placement.oom_killed()
    (worker / "memory.events").write_text(V2_FILES["memory.events"].replace("oom_kill 0",
                                                                            "oom_kill 1"))
    (worker / "memory.peak").write_text(f"{128 * MIB}\n")
    assert placement.oom_killed()
    assert placement.peak_memory_mb() == 128


def test_v2_without_a_resettable_peak_max_memory_falls_back_except_after_an_oom(fake_v2):
    ours, limiter = fake_v2
    placement = limiter.placement("echo", "echo-1", SETTINGS)
    assert isinstance(placement, WorkerCgroups)
    worker = ours / f"flowrun-{os.getpid()}" / "echo-1"
    os.close(placement._peak_fd)
    placement._peak_fd = os.open(worker / "memory.peak", os.O_RDONLY)  # as before Linux 6.12
    assert placement.peak_counter() is None  # so the worker measures its own peak RSS
    assert placement.peak_memory_mb() is None
    (worker / "memory.events").write_text("oom_kill 1\n")
    (worker / "memory.peak").write_text(f"{128 * MIB}\n")
    assert placement.peak_memory_mb() == 128


def test_v2_cpu_usage_comes_from_cpu_stat(fake_v2):
    ours, limiter = fake_v2
    placement = limiter.placement("echo", "echo-1", SETTINGS)
    stat = ours / f"flowrun-{os.getpid()}" / "echo-1" / "cpu.stat"
    stat.write_text("usage_usec 251000\nuser_usec 200800\nsystem_usec 50200\n")
    assert placement.cpu_usage_ms() == 251.0


def test_v2_the_daemon_moves_to_its_own_leaf_when_its_cgroup_refuses_controllers(tmp_path):
    parent = tmp_path / "service"
    fake_cgroup(parent)
    calls = []

    def refuse_while_busy(directory: Path, names) -> None:
        calls.append(directory)
        if directory == parent and not (parent / "flowrun-1" / "daemon").exists():
            raise OSError(16, "Device or resource busy")

    original = cgroup_v2.enable
    cgroup_v2.enable = refuse_while_busy  # type: ignore[assignment]
    try:
        cgroup_v2.prepare_parent(parent, parent / "flowrun-1", ["memory"], 77, fake_cgroup)
    finally:
        cgroup_v2.enable = original  # type: ignore[assignment]
    assert (parent / "flowrun-1" / "daemon" / "cgroup.procs").read_text() == "77"
    assert calls == [parent, parent, parent / "flowrun-1"]


def test_v2_release_removes_the_worker_cgroup_once_it_is_empty(fake_v2):
    ours, limiter = fake_v2
    placement = limiter.placement("echo", "echo-1", SETTINGS)
    worker = ours / f"flowrun-{os.getpid()}" / "echo-1"
    placement.release()
    assert worker.exists()  # a fake cgroup keeps its files; the kernel would let go
    for file in worker.iterdir():
        file.unlink()
    limiter.tree.retry_pending()
    assert not worker.exists()


def test_v2_on_the_real_cgroup2_mount_a_worker_is_placed_counted_and_killed():
    unified = detect().unified
    assert unified is not None, "this host has a cgroup2 mount at /sys/fs/cgroup/unified"
    controller = Controller("cpuacct", 2, unified.mount, unified.current)
    host = Host({"cpuacct": controller}, unified, privileged=True)
    tree = CgroupTree(host, ["cpuacct"])
    limits = LinuxLimiter(host=host).limits_for(SETTINGS)
    placement = WorkerCgroups(tree, "spin-1", limits)
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        placement.place(child.pid)
        directory = next(iter(placement.dirs))
        assert (directory / "cgroup.procs").read_text().split() == [str(child.pid)]
        placement.before_invoke()
        for _ in range(500):
            if (placement.cpu_usage_ms() or 0) > 20:
                break
            time.sleep(0.01)
        assert (placement.cpu_usage_ms() or 0) > 20
        placement.kill_all()  # cgroup.kill
        assert child.wait(timeout=5) == -9
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        placement.release()
        tree.retry_pending()
    assert not directory.exists()
