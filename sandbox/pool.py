"""Warm worker processes, per function, and the round trip of one invocation.

Each function gets a ``FunctionPool`` holding up to ``concurrency`` worker processes. An
idle warm worker is reused; otherwise a new one is started (a cold start). A worker that
timed out or died is killed with its whole process group (and cgroup) and dropped; the next
invocation starts a fresh one. The dispatcher bounds concurrency, so a pool never has more
invocations than workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandbox import protocol
from sandbox.isolation import Limiter, NoIsolation, Placement
from sandbox.limits import rlimits
from sandbox.spinloop import LoopSpinner

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
INIT_TIMEOUT_S = 10.0
STOP_GRACE_S = 2.0
READ_CHUNK_BYTES = 64 * 1024  # a read of 128 KiB or more may go through mmap: ~20 µs
_worker_ids = itertools.count(1)
_reapers: set[asyncio.Task[None]] = set()


@dataclass(frozen=True)
class WorkerSpec:
    """Everything needed to start workers for one function."""

    function: str
    handler: str
    code_dir: Path
    memory_mb: int = 128
    timeout_s: float = 3.0
    concurrency: int = 10
    environment: Mapping[str, str] = field(default_factory=dict)
    python: str = sys.executable
    idle_timeout_s: float = 600.0
    spin_us: int = 100
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class RawResult:
    """One invocation as the worker (or its death) reported it."""

    status: str  # success | error | timeout
    payload_json: str = "null"
    error: dict[str, Any] | None = None
    logs: str = ""
    duration_ms: float = 0.0
    init_ms: float | None = None
    max_memory_mb: int = 0
    cpu_user_ms: float = 0.0
    cpu_system_ms: float = 0.0


class WorkerGone(Exception):
    pass


class WorkerProcess:
    """One worker subprocess and the pipes to it."""

    def __init__(self, spec: WorkerSpec, limiter: Limiter,
                 spinner: LoopSpinner | None = None) -> None:
        self.spec = spec
        self.spinner = spinner or LoopSpinner()
        self.id = f"{spec.function}-{next(_worker_ids)}"
        self.placement: Placement = limiter.placement(spec.function, self.id, spec.settings)
        self._limiter = limiter
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0
        self._waiter: asyncio.Future[dict[str, Any] | None] | None = None
        self._writer: asyncio.WriteTransport | None = None
        self._read_fd = -1
        self._read_loop: asyncio.AbstractEventLoop | None = None
        self._frames = protocol.FrameBuffer()
        self._pidfd = -1
        self._write_fd = -1
        self._encode = protocol.encoder()
        self._deadline = 0.0
        self._watchdog: asyncio.TimerHandle | None = None
        self.alive = False
        self.invocations = 0
        self.last_used = time.monotonic()
        self.timed_out = False

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> tuple[float, dict[str, Any] | None]:
        """Start the process, place it, run init; returns (init_ms, init_error)."""
        loop = asyncio.get_running_loop()
        to_worker_r, to_worker_w = os.pipe()
        from_worker_r, from_worker_w = os.pipe()
        env = dict(self.spec.environment)
        env["FLOWRUN_FD_IN"] = str(to_worker_r)
        env["FLOWRUN_FD_OUT"] = str(from_worker_w)
        env["FLOWRUN_LIMITS"] = rlimits.encode(self._limiter.rlimits(self.spec.settings))
        pass_fds = [to_worker_r, from_worker_w]
        counter = self._peak_counter()
        if counter is not None:  # the worker resets and reads its cgroup's peak itself
            env["FLOWRUN_PEAK_FD"] = f"{counter[0]}:{counter[1].decode()}"
            pass_fds.append(counter[0])
        env.update(self._limiter.worker_environment(self.spec.settings))  # FLOWRUN_ENTER
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p
        )
        argv = [*self._limiter.command_prefix(self.spec.settings),
                self.spec.python, "-m", "sandbox.worker"]
        try:
            self.proc = subprocess.Popen(
                argv, env=env, cwd=str(self.spec.code_dir), stdin=subprocess.DEVNULL,
                pass_fds=pass_fds, start_new_session=True,
            )
        except BaseException:
            os.close(to_worker_w)
            os.close(from_worker_r)
            raise
        finally:
            os.close(to_worker_r)
            os.close(from_worker_w)
        self.pid = self.proc.pid
        self.alive = True
        try:
            self.placement.place(self.pid)
        except Exception:
            self.kill()
            os.close(to_worker_w)
            os.close(from_worker_r)
            raise
        os.set_blocking(from_worker_r, False)
        self._read_fd = from_worker_r
        self._read_loop = loop
        loop.add_reader(from_worker_r, self._readable)
        write_transport, _ = await loop.connect_write_pipe(
            asyncio.Protocol, os.fdopen(to_worker_w, "wb", buffering=0))
        self._writer = write_transport
        self._write_fd = to_worker_w
        with contextlib.suppress(OSError, AttributeError):
            self._pidfd = os.pidfd_open(self.pid)
            loop.add_reader(self._pidfd, self._exited)
        started = time.perf_counter()
        ready = await self._request({"t": "init", "handler": self.spec.handler,
                                     "code": str(self.spec.code_dir),
                                     "spin_us": self.spec.spin_us}, INIT_TIMEOUT_S)
        if ready is None:
            error = self._death_error("") if not self.timed_out else {
                "errorType": "Runtime.InitTimeout",
                "errorMessage": f"Init timed out after {INIT_TIMEOUT_S:.2f} seconds",
                "stackTrace": []}
            return (time.perf_counter() - started) * 1000, error
        return float(ready.get("init_ms", 0.0)), ready.get("error")

    def _peak_counter(self) -> tuple[int, bytes] | None:
        try:
            return self.placement.peak_counter()
        except OSError:
            return None

    def _exited(self) -> None:
        self._gone("process exited")

    def _gone(self, why: str) -> None:
        if self._pidfd >= 0:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self.alive:
            self.alive = False
            self._kill_group()
            self._reap_soon()
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _reap_soon(self) -> None:
        """Collect the exit status in the background so no zombie is left behind."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(RuntimeError):
            task = asyncio.get_running_loop().create_task(self._reap())
            _reapers.add(task)
            task.add_done_callback(_reapers.discard)

    async def _reap(self) -> None:
        assert self.proc is not None
        for _ in range(500):
            if self.proc.poll() is not None:
                return
            await asyncio.sleep(0.01)

    def _kill_group(self) -> None:
        if self.pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            self.placement.kill_all()

    def kill(self) -> None:
        """SIGKILL the worker's process group and cgroup, now."""
        self._kill_group()
        self._gone("killed")

    def returncode(self) -> int | None:
        if self.proc is None:
            return None
        with contextlib.suppress(subprocess.TimeoutExpired, ChildProcessError):
            return self.proc.wait(timeout=0.5)
        return self.proc.poll()

    async def stop(self) -> None:
        """Ask the worker to exit, then SIGTERM, then SIGKILL its group; release its cgroup."""
        if self.alive and self._writer is not None and self._waiter is None:
            with contextlib.suppress(Exception):
                self._writer.write(self._encode({"t": "stop"}))
        deadline = time.monotonic() + STOP_GRACE_S
        if self.proc is not None:
            while self.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.pid, signal.SIGTERM)
                await asyncio.sleep(0.05)
        self.kill()
        self.returncode()
        self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._close_reader()
        self._write_fd = -1
        with contextlib.suppress(Exception):
            self.placement.release()

    # ---------------------------------------------------------------- invocations

    def _readable(self) -> None:
        """The reply pipe has data: read it straight off the descriptor and hand on whole
        frames. (asyncio's pipe transport reads 256 KiB at a time, which glibc may serve
        with mmap and munmap: about 20 µs a read in a fresh process.)"""
        try:
            data = os.read(self._read_fd, READ_CHUNK_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close_reader()
            self._gone("pipe closed")
            return
        try:
            frames = self._frames.feed(data)
        except ValueError:  # not our protocol (or over the size limit): the worker is broken
            self._close_reader()
            self.kill()
            return
        for frame in frames:
            self._frame(frame)

    def _close_reader(self) -> None:
        if self._read_fd >= 0:
            if self._read_loop is not None and not self._read_loop.is_closed():
                self._read_loop.remove_reader(self._read_fd)
            os.close(self._read_fd)
            self._read_fd = -1

    def _frame(self, frame: dict[str, Any]) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(frame)

    def _send(self, data: bytes) -> None:
        """Write straight to the pipe when it takes the whole frame (the common case);
        otherwise let the transport buffer the rest."""
        assert self._writer is not None
        if self._write_fd >= 0 and not self._writer.get_write_buffer_size():
            try:
                written = os.write(self._write_fd, data)
            except BlockingIOError:
                written = 0
            except OSError:
                written = len(data)  # the worker is gone; its death is reported separately
            if written == len(data):
                return
            data = data[written:]
        self._writer.write(data)

    def _arm(self, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        """Set the deadline of the request being sent. One watchdog timer per worker is
        re-armed only when it would fire after the new deadline (cheaper than a timer per
        request); when it fires early it looks at the current deadline and re-arms."""
        deadline = self._deadline = loop.time() + timeout_s
        watchdog = self._watchdog
        if watchdog is None or watchdog.when() > deadline:
            if watchdog is not None:
                watchdog.cancel()
            self._watchdog = loop.call_at(deadline, self._check_deadline)

    def _check_deadline(self) -> None:
        self._watchdog = None
        if self._waiter is None:
            return  # idle: the next request arms it again
        loop = asyncio.get_running_loop()
        if loop.time() >= self._deadline:
            self.timed_out = True
            self.kill()
        else:
            self._watchdog = loop.call_at(self._deadline, self._check_deadline)

    async def _request(self, frame: dict[str, Any], timeout_s: float) -> dict[str, Any] | None:
        if not self.alive or self._writer is None:
            return None
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[dict[str, Any] | None] = loop.create_future()
        self._waiter = waiter
        self._arm(loop, timeout_s)
        self._send(self._encode(frame))
        self.spinner.sent()
        try:
            return await waiter
        finally:
            self.spinner.answered()

    async def invoke(self, request_id: str, event_json: str | bytes, timeout_s: float,
                     extra: Mapping[str, Any] | None = None) -> RawResult:
        self.invocations += 1
        self.placement.before_invoke()
        frame: dict[str, Any] = {"t": "invoke", "id": request_id, "event": event_json,
                                 "deadline_ms": time.time() * 1000 + timeout_s * 1000}
        if extra:
            frame.update(extra)
        started = time.perf_counter()
        reply = await self._request(frame, timeout_s)
        self.last_used = time.monotonic()
        if reply is None:
            return self._failure(request_id, timeout_s, (time.perf_counter() - started) * 1000)
        memory_mb = -(-reply.get("max_memory_kb", 0) // 1024)
        ok = reply["ok"]
        return RawResult("success" if ok else "error",
                         reply.get("payload", "null") if ok else "null",
                         None if ok else reply.get("error"), reply["logs"], reply["duration_ms"],
                         None, memory_mb, reply["cpu_user_ms"], reply["cpu_system_ms"])

    def _failure(self, request_id: str, timeout_s: float, elapsed_ms: float) -> RawResult:
        if self.timed_out and not self.placement.oom_killed():
            return RawResult(status="timeout", duration_ms=timeout_s * 1000,
                             max_memory_mb=self.placement.peak_memory_mb() or 0,
                             error={"errorType": "Sandbox.Timedout",
                                    "errorMessage": f"Task timed out after {timeout_s:.2f} seconds",
                                    "stackTrace": []})
        return RawResult(status="error", duration_ms=elapsed_ms,
                         max_memory_mb=self.placement.peak_memory_mb() or 0,
                         error=self._death_error(request_id))

    def _death_error(self, request_id: str) -> dict[str, Any]:
        code = self.returncode()
        if code is None:
            detail = "unknown"
        elif code < 0:
            try:
                detail = f"signal: {signal.Signals(-code).name.removeprefix('SIG').lower()}"
            except ValueError:
                detail = f"signal: {-code}"
            detail = detail.replace("signal: kill", "signal: killed")
        else:
            detail = f"exit status {code}"
        prefix = f"RequestId: {request_id} " if request_id else ""
        if self.placement.oom_killed():
            return {"errorType": "Runtime.OutOfMemory",
                    "errorMessage": f"{prefix}Error: Runtime exited with error: {detail}",
                    "stackTrace": []}
        return {"errorType": "Runtime.ExitError",
                "errorMessage": f"{prefix}Error: Runtime exited with error: {detail}",
                "stackTrace": []}


@dataclass
class PoolStatistics:
    function: str
    workers: int
    idle: int
    busy: int
    cold_starts: int
    invocations: int


class FunctionPool:
    """The warm workers of one function."""

    def __init__(self, spec: WorkerSpec, limiter: Limiter,
                 spinner: LoopSpinner | None = None) -> None:
        self.spec = spec
        self.limiter = limiter
        self.spinner = spinner or LoopSpinner()
        self.idle: list[WorkerProcess] = []
        self.busy: set[WorkerProcess] = set()
        self.cold_starts = 0
        self.invocations = 0

    async def invoke(self, request_id: str, event_json: str | bytes, timeout_s: float | None = None,
                     extra: Mapping[str, Any] | None = None) -> RawResult:
        timeout = self.spec.timeout_s if timeout_s is None else timeout_s
        self.invocations += 1
        init_ms: float | None = None
        worker = None
        while self.idle:
            candidate = self.idle.pop()
            if candidate.alive:
                worker = candidate
                break
            candidate.close()
        if worker is None:
            worker = WorkerProcess(self.spec, self.limiter, self.spinner)
            self.busy.add(worker)
            self.cold_starts += 1
            try:
                init_ms, init_error = await worker.start()
            except BaseException:
                self.busy.discard(worker)
                worker.kill()
                worker.close()
                raise
            if init_error is not None:
                self.busy.discard(worker)
                await worker.stop()
                return RawResult(status="error", error=init_error, init_ms=init_ms)
        else:
            self.busy.add(worker)
        try:
            result = await worker.invoke(request_id, event_json, timeout, extra)
        except BaseException:
            worker.kill()
            raise
        finally:
            self.busy.discard(worker)
            if worker.alive:
                self.idle.append(worker)
            else:
                worker.close()
        if init_ms is not None:
            result.init_ms = init_ms
        return result

    async def reap_idle(self, now: float | None = None) -> int:
        """Stop workers idle for longer than ``idle_timeout_s``; returns how many."""
        now = time.monotonic() if now is None else now
        stale = [w for w in self.idle if now - w.last_used > self.spec.idle_timeout_s]
        for worker in stale:
            self.idle.remove(worker)
        await asyncio.gather(*(w.stop() for w in stale))
        return len(stale)

    async def close(self) -> None:
        workers = [*self.idle, *self.busy]
        self.idle.clear()
        self.busy.clear()
        await asyncio.gather(*(w.stop() for w in workers), return_exceptions=True)

    def statistics(self) -> PoolStatistics:
        return PoolStatistics(self.spec.function, len(self.idle) + len(self.busy), len(self.idle),
                              len(self.busy), self.cold_starts, self.invocations)


class WorkerPool:
    """All functions' pools; the interface the dispatcher talks to."""

    def __init__(self, limiter: Limiter | None = None) -> None:
        self.limiter: Limiter = limiter or NoIsolation()
        self.spinner = LoopSpinner()  # shared: the loop polls while any reply is due
        self.pools: dict[str, FunctionPool] = {}
        self._reaper: asyncio.Task[None] | None = None

    def add(self, spec: WorkerSpec) -> FunctionPool:
        pool = FunctionPool(spec, self.limiter, self.spinner)
        self.pools[spec.function] = pool
        return pool

    def start(self) -> None:
        self._reaper = asyncio.get_running_loop().create_task(self._reap_forever())

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(5)
            for pool in list(self.pools.values()):
                await pool.reap_idle()

    def kill_all(self) -> None:
        """SIGKILL every worker of every function now (their requests end as deaths)."""
        for pool in self.pools.values():
            for worker in [*pool.busy, *pool.idle]:
                worker.kill()

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        await asyncio.gather(*(p.close() for p in self.pools.values()))
        loop = asyncio.get_running_loop()  # reap killed workers (e.g. timed out) before leaving
        await asyncio.gather(*(t for t in list(_reapers) if t.get_loop() is loop),
                             return_exceptions=True)
