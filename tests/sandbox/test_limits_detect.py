"""Detecting which cgroup version serves each controller, from mountinfo and /proc/self/cgroup."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from sandbox.limits.detect import describe_host, detect, parse_mountinfo, parse_proc_cgroup
from sandbox.limits.linux import LinuxLimiter

HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
HYBRID_CGROUP = """\
9:name=systemd:/
8:pids:/
4:memory:/process_api/29cb
2:cpuacct:/
1:cpu:/
0::/
"""
COMOUNTED_MOUNTINFO = """\
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 /docker/abc /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
"""


def write_proc(tmp_path: Path, mountinfo: str, cgroup: str) -> Path:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "mountinfo").write_text(mountinfo)
    (proc / "cgroup").write_text(cgroup)
    return proc


def test_a_hybrid_host_is_decided_per_controller(tmp_path):
    host = detect(write_proc(tmp_path, HYBRID_MOUNTINFO, HYBRID_CGROUP))
    versions = {name: c.version for name, c in host.controllers.items()}
    assert versions == {"memory": 1, "cpu": 1, "cpuacct": 1, "pids": 1}
    assert host.controllers["memory"].directory == Path("/sys/fs/cgroup/memory/process_api/29cb")
    assert host.unified is not None and host.unified.mount == Path("/sys/fs/cgroup/unified")


def test_a_pure_v2_host_serves_every_controller_from_the_unified_mount(tmp_path):
    root = tmp_path / "cgroup"
    (root / "system.slice" / "flowrun.service").mkdir(parents=True)
    (root / "system.slice" / "flowrun.service" / "cgroup.controllers").write_text(
        "cpuset cpu io memory pids\n")
    proc = write_proc(tmp_path, f"30 23 0:26 / {root} rw - cgroup2 cgroup2 rw\n",
                      "0::/system.slice/flowrun.service\n")
    host = detect(proc)
    assert {n: c.version for n, c in host.controllers.items()} == {
        "memory": 2, "cpu": 2, "pids": 2, "cpuacct": 2}
    assert host.controllers["memory"].directory == root / "system.slice" / "flowrun.service"


def test_co_mounted_controllers_and_a_namespaced_mount_root_are_understood(tmp_path):
    proc = write_proc(tmp_path, COMOUNTED_MOUNTINFO, "3:cpu,cpuacct:/a\n2:memory:/docker/abc/x\n")
    host = detect(proc)
    assert host.controllers["cpu"].directory == host.controllers["cpuacct"].directory
    assert host.controllers["memory"].directory == Path("/sys/fs/cgroup/memory/x")


def test_parsers_ignore_what_they_do_not_know():
    assert parse_mountinfo("garbage\n1 2 3:4 / /x rw - ext4 /dev/sda rw\n") == []
    assert parse_proc_cgroup("0::/\nnonsense\n") == {"": "/"}


def test_without_cgroups_or_privileges_limits_fall_back_to_rlimits_and_say_so(tmp_path):
    host = detect(write_proc(tmp_path, "", ""), privileged=False)
    limiter = LinuxLimiter(host=host)
    settings = {"memory_mb": 256, "pids_max": 64, "ephemeral_storage_mb": 32}
    limits = limiter.rlimits(settings)
    assert limits["as"] == (256 + 1024) * 1024 * 1024
    assert limits["nproc"] == limiter._own_processes + 64  # its user's processes + pids_max
    assert limits["fsize"] == 32 * 1024 * 1024
    assert limits["nofile"] == 1024 and limits["core"] == 0
    described = limiter.describe()
    assert described["memory"].startswith("rlimit AS")
    assert described["pids"].startswith("rlimit NPROC")
    assert described["network"].startswith("not enforced (needs root")
    assert limiter.worker_environment(settings) == {}


def test_flowrun_status_describes_what_this_host_enforces():
    described = describe_host()
    assert described["memory"].startswith("cgroup v1")
    assert described["pids"].startswith("cgroup v1")
    assert described["user"].startswith("permissions.user")


async def test_without_cgroups_an_allocation_past_the_address_space_cap_fails(make_runtime,
                                                                              tmp_path):
    limiter = LinuxLimiter(host=detect(write_proc(tmp_path, "", ""), privileged=False))
    runtime = await make_runtime("""
state_dir: state
functions:
  hog: {handler: limits_handlers.allocate, code: "{functions}", memory_mb: 128}
""", limiter=limiter)
    assert (await runtime.invoke("hog", {"mb": 16})).status == "success"
    result = await runtime.invoke("hog", {"mb": 2048})
    assert (result.status, result.error_type) == ("error", "MemoryError")
    assert runtime.status()["limits"]["memory"].startswith("rlimit AS")


def test_flowrun_status_without_a_daemon_lists_the_limits_of_this_host(make_config):
    path = make_config("""
state_dir: state
functions:
  echo: {handler: handlers.echo, code: "{functions}"}
""")
    out = subprocess.run([sys.executable, "-m", "flowrun.cli", "status", "-c", str(path)],
                         capture_output=True, text=True, timeout=60).stdout
    assert "not running" in out
    assert re.search(r"memory\s+cgroup v1", out), out
    assert re.search(r"pids\s+cgroup v1", out), out
