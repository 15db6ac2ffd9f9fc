"""Memory, pids and CPU limits on this host's real cgroups (hybrid: v1 controllers)."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from flowrun.logs import report_line
from sandbox.limits.cgroups import CgroupTree
from sandbox.limits.detect import Controller, Host, detect
from sandbox.limits.linux import LinuxLimiter

CONFIG = """
state_dir: state
functions:
  hog: {handler: limits_handlers.allocate, code: "{functions}", memory_mb: 128, concurrency: 1,
        timeout_s: 30}  # at its 0.07 CPU share, on a loaded machine, 128 MB takes seconds
  neighbour: {handler: limits_handlers.identity, code: "{functions}"}
  forker: {handler: limits_handlers.fork_many, code: "{functions}", pids_max: 24, timeout_s: 20}
  spinner: {handler: limits_handlers.spin, code: "{functions}", memory_mb: 128, timeout_s: 20,
            concurrency: 1}
  fast: {handler: limits_handlers.spin, code: "{functions}", memory_mb: 128, cpus: 1,
         timeout_s: 20, concurrency: 1}
"""


@pytest.fixture(autouse=True)
def cgroups_on_this_host() -> None:
    host = detect()
    usable = [n for n in ("memory", "cpu", "cpuacct", "pids")
              if n in host.controllers and host.writable(host.controllers[n])]
    assert host.privileged and len(usable) == 4, (
        f"these tests need root and writable memory/cpu/cpuacct/pids cgroups; have {usable}")


def worker_of(runtime, function):
    pool = runtime.pool.pools[function]
    return next(iter([*pool.idle, *pool.busy]))


def flowrun_cgroups() -> list[str]:
    found = []
    for name in ("memory", "cpu", "cpuacct", "pids"):
        controller = detect().controllers[name]
        found += [str(p) for p in controller.directory.glob(f"flowrun-{os.getpid()}/*")
                  if p.is_dir()]
    return found


async def test_the_default_limiter_puts_each_worker_in_its_own_cgroups(make_runtime):
    runtime = await make_runtime(CONFIG)
    assert isinstance(runtime.pool.limiter, LinuxLimiter)
    await runtime.invoke("neighbour", {})
    placement = worker_of(runtime, "neighbour").placement
    pid = worker_of(runtime, "neighbour").pid
    for directory in placement.dirs:
        assert str(pid) in (directory / "cgroup.procs").read_text().split()
    memory = placement.memory[1]
    assert int((memory / "memory.limit_in_bytes").read_text()) == 128 * 1024 * 1024
    assert int((placement.pids[1] / "pids.max").read_text()) == 256


async def test_a_function_allocating_past_its_limit_is_out_of_memory_while_a_neighbour_answers(
        make_runtime):
    runtime = await make_runtime(CONFIG)
    hog = asyncio.create_task(runtime.invoke("hog", {"mb": 400}))
    answers = [await runtime.invoke("neighbour", {}) for _ in range(3)]
    result = await hog
    assert [a.status for a in answers] == ["success"] * 3
    assert result.status == "error"
    assert result.error_type == "Runtime.OutOfMemory"
    assert 120 <= result.max_memory_used_mb <= 128
    assert "Max Memory Used: 12" in report_line(result)
    row = list(runtime.ledger.rows(function="hog"))[-1]
    assert (row.error_type, row.max_memory_used_mb) == ("Runtime.OutOfMemory",
                                                        result.max_memory_used_mb)
    again = await runtime.invoke("hog", {"mb": 10})
    assert again.status == "success"
    assert again.init_duration_ms is not None  # a fresh worker took the killed one's place


async def test_max_memory_used_of_a_small_invocation_after_a_big_one_shows_the_small_one(
        make_runtime):
    runtime = await make_runtime(CONFIG)
    big = await runtime.invoke("hog", {"mb": 80})
    small = await runtime.invoke("hog", {"mb": 1})
    assert big.status == small.status == "success"
    assert big.max_memory_used_mb >= 80
    assert small.max_memory_used_mb < 40
    assert worker_of(runtime, "hog").invocations == 2  # the same warm worker


async def test_a_fork_bomb_is_contained_by_the_pids_cap_and_the_daemon_stays_responsive(
        make_runtime):
    runtime = await make_runtime(CONFIG)
    bomb = asyncio.create_task(runtime.invoke("forker", {"n": 2000}))
    neighbour = await runtime.invoke("neighbour", {})
    result = await bomb
    assert neighbour.status == "success"
    assert result.status == "success", result.error_message
    assert result.payload["error"] == "EAGAIN"
    assert 0 < result.payload["forked"] < 24
    assert (await runtime.invoke("neighbour", {})).status == "success"


async def test_a_cpu_bound_function_at_128_mb_gets_about_its_share_of_one_cpu(make_runtime):
    runtime = await make_runtime(CONFIG)
    await runtime.invoke("spinner", {"seconds": 0})  # cold start outside the window
    placement = worker_of(runtime, "spinner").placement
    window_s = 2.0
    before_ms = placement.cpu_usage_ms()
    started = time.monotonic()
    result = await runtime.invoke("spinner", {"seconds": window_s})
    wall_s = time.monotonic() - started
    share = (placement.cpu_usage_ms() - before_ms) / 1000 / wall_s
    assert result.status == "success"
    assert 0.03 <= share <= 0.2, f"128 MB got {share:.3f} CPUs (expected about {128 / 1769:.3f})"
    cfs_quota = int((placement.cpu[1] / "cpu.cfs_quota_us").read_text())
    assert cfs_quota == round(128 / 1769 * 100_000)


async def test_cpus_overrides_the_share_that_follows_memory(make_runtime):
    runtime = await make_runtime(CONFIG)
    await runtime.invoke("fast", {"seconds": 0})
    placement = worker_of(runtime, "fast").placement
    before_ms = placement.cpu_usage_ms()
    started = time.monotonic()
    result = await runtime.invoke("fast", {"seconds": 1.0})
    cgroup_ms = placement.cpu_usage_ms() - before_ms
    share = cgroup_ms / 1000 / (time.monotonic() - started)
    assert int((placement.cpu[1] / "cpu.cfs_quota_us").read_text()) == 100_000
    assert share > 0.3  # a shared, noisy machine: far above the 128 MB share is enough
    worker_ms = result.cpu_user_ms + result.cpu_system_ms  # what the ledger records
    assert abs(worker_ms - cgroup_ms) < 0.25 * cgroup_ms + 30, (worker_ms, cgroup_ms)


async def test_cgroups_are_removed_when_the_workers_go(make_runtime):
    runtime = await make_runtime(CONFIG)
    await runtime.invoke("neighbour", {})
    await runtime.invoke("forker", {"n": 3})
    directories = [d for f in ("neighbour", "forker") for d in worker_of(runtime, f).placement.dirs]
    assert len(directories) == 8 and set(map(str, directories)) <= set(flowrun_cgroups())
    await runtime.stop()
    for _ in range(250):
        if not any(d.exists() for d in directories):
            break
        await asyncio.sleep(0.02)
    assert [d for d in directories if d.exists()] == []


def test_leftovers_of_a_dead_daemon_are_removed_at_start() -> None:
    controller = detect().controllers["pids"]
    dead = controller.directory / "flowrun-999999999"
    (dead / "echo-1").mkdir(parents=True)
    limiter = LinuxLimiter()
    assert limiter.tree.controllers
    assert not dead.exists()


def test_leftovers_of_a_dead_daemon_in_a_sibling_cgroup_are_removed_too() -> None:
    real = detect().controllers["memory"]
    scope = real.directory / f"flowrun-test-{os.getpid()}"  # all of it under our own cgroup
    ours, dead = scope / "ours", scope / "finished-job" / "flowrun-999999998"
    ours.mkdir(parents=True)
    (dead / "heartbeat-1").mkdir(parents=True)
    controller = Controller("memory", 1, real.mount, f"{real.current}/{scope.name}/ours")
    tree = CgroupTree(Host({"memory": controller}, None, True), ["memory"])
    try:
        tree.prepare()
        assert not dead.exists()
    finally:
        for directory in (dead / "heartbeat-1", dead, scope / "finished-job",
                          ours / f"flowrun-{os.getpid()}", ours, scope):
            if directory.exists():
                directory.rmdir()
