"""The execution role: network namespaces, another user, a private scratch, a hidden state dir."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import pytest

from flowrun.runtime import lambda_environment
from sandbox.limits import user
from sandbox.limits.detect import Host, detect
from sandbox.limits.linux import LinuxLimiter
from sandbox.limits.loopback_bpf import LoopbackOnly

CONFIG = """
state_dir: state
functions:
  who: {handler: limits_handlers.identity, code: "{functions}", environment: {COLOUR: blue},
        permissions: {user: nobody}}
  default: {handler: limits_handlers.identity, code: "{functions}"}
  rooted: {handler: limits_handlers.identity, code: "{functions}", permissions: {user: root}}
  offline: {handler: limits_handlers.connect, code: "{functions}", permissions: {network: none}}
  local: {handler: limits_handlers.connect, code: "{functions}",
          permissions: {network: loopback}}
  online: {handler: limits_handlers.connect, code: "{functions}"}
  scratch: {handler: limits_handlers.write_scratch, code: "{functions}",
            ephemeral_storage_mb: 4, memory_mb: 256}
  reader: {handler: limits_handlers.read_paths, code: "{functions}", permissions: {user: nobody}}
  root_reader: {handler: limits_handlers.read_paths, code: "{functions}"}
"""

# Set by the interpreter itself at start-up (PEP 538 locale coercion) and by the pool.
INTERPRETER_VARIABLES = {"LC_CTYPE", "PYTHONPATH"}


@pytest.fixture(autouse=True)
def root_daemon() -> None:
    assert os.geteuid() == 0, "the execution role tests need a root daemon"


@pytest.fixture
async def daemon_port() -> AsyncIterator[int]:
    """A port on the daemon's 127.0.0.1 that accepts connections."""
    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


async def test_a_worker_runs_as_the_user_its_permissions_name(make_runtime):
    runtime = await make_runtime(CONFIG)
    who = (await runtime.invoke("who", {})).payload
    rooted = (await runtime.invoke("rooted", {})).payload
    assert (who["uid"], who["gid"]) == (65534, 65534)
    assert rooted["uid"] == 0


async def test_without_a_dedicated_flowrun_user_the_default_keeps_the_daemons_user(make_runtime):
    assert not user.resolve(None), "this host has a flowrun user; the default would use it"
    runtime = await make_runtime(CONFIG)
    assert (await runtime.invoke("default", {})).payload["uid"] == 0
    assert "no dedicated 'flowrun' user" in runtime.status()["limits"]["user"]


async def test_a_worker_as_nobody_imports_its_code_from_a_private_temp_folder(make_runtime,
                                                                             tmp_path):
    code = tmp_path / "code"  # under pytest's 0700 temp root: unreachable for nobody
    code.mkdir()
    (code / "private.py").write_text("import os\ndef handler(e, c):\n    return os.getuid()\n")
    runtime = await make_runtime(CONFIG + f"""
  private: {{handler: private.handler, code: "{code}", permissions: {{user: nobody}}}}
""")
    result = await runtime.invoke("private", {})
    assert (result.status, result.payload) == ("success", 65534)


async def test_the_environment_holds_only_the_declared_and_lambdas_variables(make_runtime):
    runtime = await make_runtime(CONFIG)
    os.environ["FLOWRUN_TEST_SECRET"] = "daemon only"
    try:
        names = set((await runtime.invoke("who", {})).payload["environment"])
    finally:
        del os.environ["FLOWRUN_TEST_SECRET"]
    fn = runtime.config.functions["who"]
    expected = set(lambda_environment("who", fn, runtime.state_dir / "tmp" / "who"))
    assert "COLOUR" in names
    assert names - INTERPRETER_VARIABLES == expected


async def test_a_connect_to_127_0_0_1_fails_under_network_none(make_runtime, daemon_port):
    runtime = await make_runtime(CONFIG)
    result = (await runtime.invoke("offline", {"port": daemon_port})).payload
    assert result["daemon_port"] != "ok"
    assert result["own_port"] != "ok"


async def test_a_connect_to_127_0_0_1_works_under_loopback_and_nothing_beyond_it_does(
        make_runtime, daemon_port):
    runtime = await make_runtime(CONFIG)
    result = (await runtime.invoke("local", {"port": daemon_port, "outside": "192.0.2.1"})).payload
    assert result == {"daemon_port": "ok", "own_port": "ok", "outside": "EPERM"}
    assert "BPF" in runtime.status()["limits"]["network"]


async def test_full_network_reaches_the_daemons_127_0_0_1(make_runtime, daemon_port):
    runtime = await make_runtime(CONFIG)
    result = (await runtime.invoke("online", {"port": daemon_port})).payload
    assert result == {"daemon_port": "ok", "own_port": "ok"}


async def test_writing_past_the_scratch_limit_fails_inside_the_function(make_runtime):
    runtime = await make_runtime(CONFIG)
    result = (await runtime.invoke("scratch", {"mb": 16})).payload
    assert result["error"] in ("ENOSPC", "EFBIG")
    assert result["written_mb"] < 5
    assert (await runtime.invoke("scratch", {"mb": 2})).payload == {"written_mb": 2, "error": None}


async def test_a_function_cannot_read_the_state_folder_the_ledger_or_other_scratch(make_runtime):
    runtime = await make_runtime(CONFIG)
    await runtime.invoke("who", {})
    state = runtime.state_dir
    (state / "tmp" / "who" / "note").write_text("host side")  # under the worker's tmpfs
    paths = [str(state), str(state / "ledger.db"), str(state / "logs" / "who.log"),
             str(state / "tmp" / "who"), str(state / "tmp" / "who" / "note")]
    result = (await runtime.invoke("reader", {"paths": paths})).payload
    assert result[str(state)] == "EACCES"
    assert all(result[p] in ("EACCES", "ENOENT") for p in paths), result
    assert oct(state.stat().st_mode & 0o777) == "0o700"


async def test_even_a_worker_left_as_root_does_not_see_the_ledger(make_runtime):
    runtime = await make_runtime(CONFIG)
    state = runtime.state_dir
    paths = [str(state / "ledger.db"), str(state / "logs")]
    result = (await runtime.invoke("root_reader", {"paths": paths})).payload
    assert result == {p: "ENOENT" for p in paths}


async def test_a_function_cannot_read_another_workers_environment(make_runtime):
    runtime = await make_runtime(CONFIG)
    other = (await runtime.invoke("who", {})).payload["pid"]
    result = (await runtime.invoke("reader", {"paths": [f"/proc/{other}/environ"]})).payload
    assert result[f"/proc/{other}/environ"] == "EACCES"


async def test_without_cgroup2_loopback_falls_back_to_a_namespace_of_its_own(make_runtime,
                                                                            daemon_port):
    host = detect()
    limiter = LinuxLimiter(host=Host(host.controllers, None, host.privileged))
    runtime = await make_runtime(CONFIG, limiter=limiter)
    result = (await runtime.invoke("local", {"port": daemon_port})).payload
    assert result == {"daemon_port": "ECONNREFUSED", "own_port": "ok"}
    assert "its own loopback" in limiter.describe()["network"]


PROBE = """
import socket, sys
def tcp(family, address):
    try:
        with socket.socket(family) as s:
            s.settimeout(1)
            s.connect(address)
        return "ok"
    except OSError as exc:
        return exc.errno
def udp(address):
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"x", address)
        return "ok"
    except OSError as exc:
        return exc.errno
sys.stdin.readline()
v4, v6 = int(sys.argv[1]), int(sys.argv[2])
print(repr([tcp(socket.AF_INET, ("127.0.0.1", v4)), tcp(socket.AF_INET6, ("::1", v6)),
            tcp(socket.AF_INET6, ("::ffff:127.0.0.1", v4)), tcp(socket.AF_INET6, ("2001:db8::1", 80)),
            tcp(socket.AF_INET6, ("::ffff:192.0.2.1", 80)), tcp(socket.AF_INET, ("192.0.2.1", 80)),
            udp(("127.0.0.1", 9)), udp(("192.0.2.1", 53))]))
"""


def test_the_loopback_bpf_filter_allows_127_0_0_0_8_and_ipv6_loopback_only():
    unified = detect().unified
    assert unified is not None
    programs = LoopbackOnly()
    cgroup = unified.directory / f"flowrun-test-{os.getpid()}"
    cgroup.mkdir()
    with socket.socket() as v4, socket.socket(socket.AF_INET6) as v6:
        v4.bind(("127.0.0.1", 0))
        v6.bind(("::1", 0))
        v4.listen()
        v6.listen()
        try:
            programs.attach(str(cgroup))
            probe = subprocess.Popen(
                [sys.executable, "-c", PROBE, str(v4.getsockname()[1]), str(v6.getsockname()[1])],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            (cgroup / "cgroup.procs").write_text(str(probe.pid))
            out, _ = probe.communicate("go\n", timeout=20)
        finally:
            programs.close()
            for _ in range(100):
                try:
                    cgroup.rmdir()
                    break
                except OSError:
                    time.sleep(0.01)
    eperm = errno.EPERM
    assert out.strip() == repr(["ok", "ok", "ok", eperm, eperm, eperm, "ok", eperm])


async def test_code_kept_inside_the_state_folder_still_imports(make_runtime, tmp_path):
    code = tmp_path / "state" / "generated"
    code.mkdir(parents=True)
    (code / "inner.py").write_text("def handler(e, c):\n    return 'inside'\n")
    runtime = await make_runtime(CONFIG + f"""
  inner: {{handler: inner.handler, code: "{code}"}}
""")
    result = await runtime.invoke("inner", {})
    assert (result.status, result.payload) == ("success", "inside")


async def test_status_shows_each_functions_user_network_and_cpu_share(make_runtime):
    runtime = await make_runtime(CONFIG)
    functions = runtime.status()["functions"]
    assert functions["who"]["user"] == "nobody"
    assert functions["default"]["user"] == "root"
    assert functions["offline"]["network"] == "none"
    assert functions["scratch"]["scratch_mb"] == 4
    assert functions["default"]["cpus"] == round(round(128 / 1769 * 100_000) / 100_000, 3)
