"""The worker process: imports one handler and runs it for every invoke frame it reads.

Started as ``python -m sandbox.worker`` by the pool with two pipe descriptors in
``FLOWRUN_FD_IN`` / ``FLOWRUN_FD_OUT``. It waits for an ``init`` frame (sent once the pool
has placed it in its cgroup), imports the handler — the Lambda init phase — answers
``ready``, then loops on ``invoke`` frames. ``print`` and ``logging`` output during an
invocation is captured and sent back with the result.
"""

from __future__ import annotations

import io
import json
import logging
import os
import resource
import select
import sys
import time
import traceback
from collections.abc import Callable
from types import TracebackType
from typing import Any

from sandbox import protocol
from sandbox.limits import rlimits


class LambdaContext:
    """The context object Lambda passes as the handler's second argument.

    The attributes that are the same for every invocation of a worker are worked out once
    (``context_attributes``) and copied in with one ``__dict__`` update, so that they are
    instance attributes as in Lambda's own runtime (``vars(context)`` shows them).
    """

    function_name: str
    function_version: str
    invoked_function_arn: str
    memory_limit_in_mb: str
    log_group_name: str
    log_stream_name: str
    identity: Any
    client_context: Any

    def __init__(self, request_id: str, deadline_ms: float, attributes: dict[str, Any]) -> None:
        self.__dict__.update(attributes)
        self.aws_request_id = request_id
        self._deadline_ms = deadline_ms

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int(self._deadline_ms - time.time() * 1000))


def context_attributes(env: dict[str, str]) -> dict[str, Any]:
    """This worker's function attributes for LambdaContext, from Lambda's variables."""
    name = env.get("AWS_LAMBDA_FUNCTION_NAME", "")
    return {
        "function_name": name,
        "function_version": env.get("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST"),
        "invoked_function_arn": (f"arn:aws:lambda:{env.get('AWS_REGION', 'local')}:"
                                 f"000000000000:function:{name}"),
        "memory_limit_in_mb": env.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128"),
        "log_group_name": env.get("AWS_LAMBDA_LOG_GROUP_NAME", ""),
        "log_stream_name": env.get("AWS_LAMBDA_LOG_STREAM_NAME", ""),
        "identity": None,
        "client_context": None,
    }


class _Capture(io.StringIO):
    """stdout/stderr stand-in that collects one invocation's output."""


class _LambdaLogHandler(logging.Handler):
    def __init__(self, worker: Worker) -> None:
        super().__init__()
        self.worker = worker
        self.setFormatter(logging.Formatter("[%(levelname)s]\t%(asctime)s.%(msecs)03dZ\t"
                                            "%(aws_request_id)s\t%(message)s",
                                            "%Y-%m-%dT%H:%M:%S"))
        self.formatter.converter = time.gmtime  # type: ignore[union-attr]

    def emit(self, record: logging.LogRecord) -> None:
        record.aws_request_id = self.worker.request_id
        self.worker.capture.write(self.format(record) + "\n")


def _stack(tb: TracebackType | None) -> list[str]:
    frames = [f for f in traceback.extract_tb(tb) if not f.filename.endswith("sandbox/worker.py")]
    return traceback.format_list(frames)


def _error(error_type: str, message: str, stack: list[str] | None = None) -> dict[str, Any]:
    return {"errorType": error_type, "errorMessage": message, "stackTrace": stack or []}


class RssPeak:
    """Per-invocation peak RSS of this process: reset the kernel's high-water mark after
    each reply, read it back after the next handler.

    Writing ``5`` to ``/proc/self/clear_refs`` resets the peak (Linux 4.0+). ``getrusage``
    follows that reset and is cheap, unless exec left it a parent's larger peak; then the
    probe reads ``VmHWM`` from ``/proc/self/status`` instead.
    """

    def __init__(self) -> None:
        try:
            self._clear = os.open("/proc/self/clear_refs", os.O_WRONLY)
        except OSError:
            self._clear = -1
        try:
            self._status = os.open("/proc/self/status", os.O_RDONLY)
        except OSError:
            self._status = -1
        self.reset()
        self._use_rusage = self._status < 0 or abs(self._rusage_kb() - self._hwm_kb()) < 1024

    def reset(self) -> None:
        if self._clear >= 0:
            try:
                os.write(self._clear, b"5")
            except OSError:
                self._clear = -1

    @staticmethod
    def _rusage_kb() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def _hwm_kb(self) -> int:
        data = os.pread(self._status, 4096, 0)
        start = data.find(b"VmHWM:")
        if start < 0:
            return self._rusage_kb()
        return int(data[start + 6 : data.index(b"kB", start)])

    def peak_kb(self) -> int:
        return self._rusage_kb() if self._use_rusage else self._hwm_kb()


class CgroupPeak:
    """Per-invocation peak of the worker's memory cgroup, through a descriptor the pool
    opened on its resettable peak file (``memory.max_usage_in_bytes`` on cgroup v1,
    ``memory.peak`` on v2 from Linux 6.12) and handed down: the worker resets it after
    each reply, off the invocation's path, and reads it after the next handler.
    """

    def __init__(self, fd: int, reset_bytes: bytes) -> None:
        self.fd = fd
        self.reset_bytes = reset_bytes
        self.reset()

    def reset(self) -> None:
        try:
            os.pwrite(self.fd, self.reset_bytes, 0)
        except OSError:
            pass

    def peak_kb(self) -> int:
        try:
            return int(os.pread(self.fd, 64, 0)) // 1024
        except (OSError, ValueError):
            return 0


def _spin(poller: select.poll, spin_s: float) -> None:
    """Poll for the next frame for up to ``spin_s`` before blocking on the pipe.

    Waking a process blocked on an idle CPU costs tens of microseconds (far more in VMs);
    a short spin after each reply keeps back-to-back invocations off that path, at the
    price of at most ``spin_s`` of CPU per invocation.
    """
    if spin_s <= 0:
        return
    end = time.perf_counter() + spin_s
    while time.perf_counter() < end:
        if poller.poll(0):
            return


class Worker:
    def __init__(self, fd_in: int, fd_out: int, memory: RssPeak | CgroupPeak | None = None) -> None:
        self.fd_in = fd_in
        self.fd_out = fd_out
        self.frames = protocol.FrameReader(fd_in)
        self.encode = protocol.encoder()
        self.request_id = ""
        self.capture = _Capture()
        self.handler: Callable[[Any, Any], Any] | None = None
        self.init_error: dict[str, Any] | None = None
        self.memory = memory or RssPeak()
        self.context_attributes = context_attributes(dict(os.environ))
        self.spin_s = 0.0

    def init(self, handler_spec: str, code_dir: str) -> float:
        """Import the handler; returns the init duration in ms, or records an init error."""
        started = time.perf_counter()
        sys.path.insert(0, code_dir)
        try:
            os.chdir(code_dir)
        except OSError:
            pass
        module_name, _, function_name = handler_spec.rpartition(".")
        try:
            module = __import__(module_name, fromlist=["_"])
        except SyntaxError as exc:
            self.init_error = _error("Runtime.UserCodeSyntaxError",
                                     f"Syntax error in module '{module_name}': {exc}")
        except ImportError as exc:
            self.init_error = _error("Runtime.ImportModuleError",
                                     f"Unable to import module '{module_name}': {exc}")
        except Exception as exc:  # an error raised by module-level code
            self.init_error = _error(type(exc).__name__, str(exc), _stack(exc.__traceback__))
        else:
            handler = getattr(module, function_name, None)
            if not callable(handler):
                self.init_error = _error("Runtime.HandlerNotFound",
                                         f"Handler '{function_name}' missing on module "
                                         f"'{module_name}'")
            else:
                self.handler = handler
        return (time.perf_counter() - started) * 1000

    def invoke(self, frame: dict[str, Any]) -> dict[str, Any]:
        self.request_id = frame["id"]
        capture = self.capture
        capture.seek(0)
        capture.truncate()
        sys.stdout = sys.stderr = capture
        cpu_before = os.times()
        started = time.perf_counter()
        result: dict[str, Any] = {"t": "result", "ok": True}
        try:
            if self.init_error is not None:
                result.update(ok=False, error=self.init_error)
            else:
                assert self.handler is not None
                text = frame["event"]
                event = None if text == "null" else json.loads(text)  # json: ~2 µs for "null"
                context = LambdaContext(self.request_id, frame["deadline_ms"],
                                        self.context_attributes)
                value = self.handler(event, context)
                try:
                    result["payload"] = "null" if value is None else json.dumps(value)
                except (TypeError, ValueError) as exc:
                    result.update(ok=False, error=_error("Runtime.MarshalError",
                                                         f"Unable to marshal response: {exc}"))
        except Exception as exc:
            result.update(ok=False, error=_error(type(exc).__name__, str(exc),
                                                 _stack(exc.__traceback__)))
        finally:
            duration_ms = (time.perf_counter() - started) * 1000
            cpu_after = os.times()
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        result["duration_ms"] = duration_ms
        result["cpu_user_ms"] = (cpu_after.user - cpu_before.user) * 1000
        result["cpu_system_ms"] = (cpu_after.system - cpu_before.system) * 1000
        result["max_memory_kb"] = self.memory.peak_kb()
        result["logs"] = capture.getvalue()
        return result

    def serve(self) -> None:
        init = self.frames.read()
        self.spin_s = float(init.get("spin_us", 0)) / 1e6
        init_ms = self.init(init["handler"], init["code"])
        ready: dict[str, Any] = {"t": "ready", "init_ms": init_ms, "pid": os.getpid()}
        if self.init_error is not None:
            ready["error"] = self.init_error
        protocol.write_all(self.fd_out, self.encode(ready))
        self.memory.reset()
        poller = select.poll()
        poller.register(self.fd_in, select.POLLIN)
        while True:
            _spin(poller, self.spin_s)
            try:
                frame = self.frames.read()
            except EOFError:
                return
            if frame.get("t") == "stop":
                return
            protocol.write_all(self.fd_out, self.encode(self.invoke(frame)))
            self.memory.reset()  # for the next invocation, while the daemon reads this one


def _memory_probe(env: dict[str, str] | os._Environ[str]) -> RssPeak | CgroupPeak:
    """The cgroup's peak counter when the pool handed one down, else this process's RSS."""
    peak = env.pop("FLOWRUN_PEAK_FD", "")
    if peak:
        fd, _, reset = peak.partition(":")  # "FD:BYTES THAT RESET IT"
        return CgroupPeak(int(fd), reset.encode())
    return RssPeak()


def main() -> None:
    rlimits.apply_from_env(os.environ)
    fd_in = int(os.environ.pop("FLOWRUN_FD_IN"))
    fd_out = int(os.environ.pop("FLOWRUN_FD_OUT"))
    os.environ.pop("FLOWRUN_LIMITS", None)
    role = os.environ.pop("FLOWRUN_ENTER", None)
    root = logging.getLogger()
    memory = _memory_probe(os.environ)
    # pass_fds left these inheritable: the handler's children must not get them
    for fd in (fd_in, fd_out, getattr(memory, "fd", -1)):
        if fd >= 0:
            os.set_inheritable(fd, False)
    worker = Worker(fd_in, fd_out, memory)
    if role:  # namespaces, private scratch, another user: before any user code is imported
        from sandbox.limits import enter

        enter.apply(json.loads(role))
    root.addHandler(_LambdaLogHandler(worker))
    root.setLevel(os.environ.get("AWS_LAMBDA_LOG_LEVEL", "INFO").upper())
    worker.serve()


if __name__ == "__main__":
    main()
