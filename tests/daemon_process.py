"""A real ``flowrun run`` daemon in a subprocess, for CLI and end-to-end tests.

``Daemon.start(config)`` runs the installed ``flowrun`` command, waits until its management
API answers ``/healthz``, and ``stop()`` sends SIGTERM and waits for a graceful exit. The
daemon's output goes to a file (never a pipe that could fill up) which ``output()`` reads.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0


def flowrun_command() -> list[str]:
    """The installed ``flowrun`` console script (next to this interpreter if possible)."""
    beside = Path(sys.executable).with_name("flowrun")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("flowrun")
    assert found is not None, "the flowrun command is not installed (pip install -e .)"
    return [found]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_flowrun(*args: str, cwd: Path | None = None, env: Mapping[str, str] | None = None,
                input_text: str | None = None, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    """Run one ``flowrun`` command to completion and capture its output."""
    return subprocess.run([*flowrun_command(), *args], cwd=cwd, env={**os.environ, **(env or {})},
                          input=input_text, capture_output=True, text=True, timeout=timeout_s,
                          check=False)


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (the daemon's worker processes)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
                out.extend(int(p) for p in f.read().split())
    return out


def is_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_until(predicate: Any, timeout_s: float, what: str, poll_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


@dataclass
class Daemon:
    process: subprocess.Popen[bytes]
    api: str
    log_path: Path
    _log: TextIO | None = field(default=None, repr=False)

    @classmethod
    def start(cls, config: Path, api: str, env: Mapping[str, str] | None = None,
              extra_args: tuple[str, ...] = (), cwd: Path | None = None) -> Daemon:
        """Start ``flowrun run config`` in ``cwd`` (default: the config's folder)."""
        log_path = config.parent / f"daemon-{os.getpid()}-{time.monotonic_ns()}.log"
        log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        process = subprocess.Popen([*flowrun_command(), "run", str(config), *extra_args],
                                   cwd=cwd or config.parent, env={**os.environ, **(env or {})},
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        daemon = cls(process, api, log_path, log)
        try:
            daemon.wait_ready()
        except BaseException:
            daemon.kill()
            raise
        return daemon

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"flowrun run exited with {self.process.returncode}:\n"
                                     f"{self.output()}")
            try:
                return self.call("GET", "/healthz", timeout_s=2)[0] == 200
            except OSError:
                return False

        wait_until(ready, timeout_s, "the management API to answer")

    def call(self, method: str, path: str, body: Any = None,
             headers: Mapping[str, str] | None = None,
             timeout_s: float = 60) -> tuple[int, dict[str, str], bytes]:
        """One request to the management API; HTTP errors are answers, not exceptions."""
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://{self.api}{path}", data=data, method=method,
                                         headers=dict(headers or {}))
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return response.status, {k.lower(): v for k, v in response.headers.items()}, \
                    response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()

    def invoke(self, name: str, event: Any, timeout_s: float = 60) -> tuple[int, Any]:
        status, _, body = self.call("POST", f"/2015-03-31/functions/{name}/invocations", event,
                                    timeout_s=timeout_s)
        return status, json.loads(body)

    def status(self) -> dict[str, Any]:
        status, _, body = self.call("GET", "/status", timeout_s=10)
        assert status == 200, body
        result: dict[str, Any] = json.loads(body)
        return result

    def output(self) -> str:
        if self._log is not None:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, then wait for the exit code; SIGKILL only if it does not stop in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"flowrun run did not stop within {timeout_s:.0f} s:\n"
                                 f"{self.output()}") from None
        self._close_log()
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


@contextlib.contextmanager
def running(config: Path, api: str, env: Mapping[str, str] | None = None) -> Iterator[Daemon]:
    """A daemon for the duration of a ``with`` block; killed if the block fails."""
    daemon = Daemon.start(config, api, env)
    try:
        yield daemon
    finally:
        daemon.kill()
