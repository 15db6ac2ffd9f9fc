"""The runtime: config in, running functions and triggers out — embeddable in any loop.

``Runtime`` wires the worker pool, the dispatcher, the ledger, the invocation log, the
management API and the triggers together. ``async with Runtime.from_file(path)`` starts it
inside the caller's event loop without touching signal handlers; ``serve()`` is what
``flowrun run`` calls, and adds SIGTERM/SIGINT handling for a graceful stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from flowrun import config as config_module
from flowrun import pipeline
from flowrun.config import Config, FunctionConfig
from flowrun.destinations import Destinations
from flowrun.dispatcher import Dispatcher, new_request_id
from flowrun.ledger import Ledger
from flowrun.logs import InvocationLog
from flowrun.queue import AsyncQueue
from flowrun.types import (
    FlowrunError,
    InvocationMode,
    InvocationResult,
)
from sandbox.isolation import Limiter
from sandbox.limits.cgroups import cpu_share
from sandbox.pool import WorkerPool, WorkerSpec
from triggers import registry
from triggers.base import Trigger

log = logging.getLogger("flowrun")
T = TypeVar("T")

REGION = "us-east-1"


def lambda_environment(name: str, fn: FunctionConfig, tmp_dir: Path) -> dict[str, str]:
    """The worker's whole environment: Lambda's standard variables plus the function's."""
    stream = time.strftime("%Y/%m/%d") + f"/[$LATEST]{os.urandom(16).hex()}"
    env = {
        "AWS_LAMBDA_FUNCTION_NAME": name,
        "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(fn.memory_mb),
        "AWS_LAMBDA_FUNCTION_TIMEOUT": f"{fn.timeout_s:g}",
        "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{name}",
        "AWS_LAMBDA_LOG_STREAM_NAME": stream,
        "AWS_LAMBDA_INITIALIZATION_TYPE": "on-demand",
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_EXECUTION_ENV": f"AWS_Lambda_python{sys.version_info[0]}.{sys.version_info[1]}",
        "LAMBDA_TASK_ROOT": str(fn.code),
        "LAMBDA_RUNTIME_DIR": str(Path(__file__).resolve().parents[1]),
        "_HANDLER": fn.handler,
        "TZ": ":UTC",
        "LANG": "en_US.UTF-8",
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "TMPDIR": str(tmp_dir),
        "PYTHONUNBUFFERED": "1",
    }
    env.update(fn.environment)
    return env


DEFAULT_SPIN_US = 100


def spin_us(fn: FunctionConfig) -> int:
    """How long a warm worker polls before sleeping. Spinning spends CPU, which a function
    with less than a whole CPU (its cgroup quota) would rather keep for its handler."""
    if fn.spin_us is not None:
        return fn.spin_us
    return DEFAULT_SPIN_US if cpu_share(fn.memory_mb, fn.cpus) >= 1 else 0


class Runtime:
    """One flowrun instance. Use ``async with`` or ``start()`` / ``stop()``."""

    def __init__(self, config: Config, *, limiter: Limiter | None = None,
                 start_triggers: bool = True, serve_api: bool = True,
                 run_queue: bool = True) -> None:
        self.config = config
        self.limiter = limiter
        self.start_triggers = start_triggers
        self.serve_api = serve_api
        self.run_queue = run_queue  # False: queue async work durably for the daemon to run
        if limiter is None:  # cgroups, namespaces, user, rlimits: what this host allows
            from sandbox.limits.detect import default_limiter

            limiter = default_limiter()
        self.pool = WorkerPool(limiter)
        self.dispatcher = Dispatcher(config.functions, self.pool, config.billing)
        self.ledger = Ledger(self.state_dir / "ledger.db")
        self.log = InvocationLog(self.state_dir / "logs")
        self.triggers: list[Trigger] = []
        self.started_at = 0.0
        self._shared: dict[str, Any] = {}
        self._on_stop: list[Callable[[], Awaitable[None]]] = []
        self._stop_requested: asyncio.Event | None = None
        self._started = False
        self.ready = False  # True once start() has started every trigger (GET /healthz)
        self.api: Any = None
        self.async_queue: Any = None
        self.destinations = Destinations(self)

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_file(cls, path: str | os.PathLike[str] = config_module.DEFAULT_CONFIG_NAME,
                  **kwargs: Any) -> Runtime:
        return cls(config_module.load(path), **kwargs)

    @classmethod
    def from_yaml(cls, text: str, base_dir: str | os.PathLike[str] = ".", **kwargs: Any) -> Runtime:
        return cls(config_module.parse(text, base_dir=Path(base_dir).resolve()), **kwargs)

    # ---------------------------------------------------------------- TriggerHost

    @property
    def state_dir(self) -> Path:
        return self.config.state_dir

    @property
    def config_dir(self) -> Path:
        return self.config.source.parent if self.config.source else Path.cwd()

    def shared(self, key: str, factory: Callable[[], T]) -> T:
        if key not in self._shared:
            self._shared[key] = factory()
        value: T = self._shared[key]
        return value

    def on_stop(self, callback: Callable[[], Awaitable[None]]) -> None:
        self._on_stop.append(callback)

    def has_capacity(self, function: str) -> bool:
        return self.dispatcher.gate(function).has_room()

    async def wait_for_capacity(self, function: str) -> None:
        await self.dispatcher.gate(function).wait_for_room()

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self.dispatcher.accepting = True
        self.started_at = time.time()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.ledger.open()
        self.dispatcher.listeners.append(self.ledger.record)
        self.dispatcher.listeners.append(lambda result, source: self.log.write(result))
        for name, fn in self.config.functions.items():
            self.pool.add(self._spec(name, fn))
        self.pool.start()
        try:
            self.async_queue = AsyncQueue(self, dispatch=self.run_queue)
            await self.async_queue.start()
            if self.serve_api and self.config.api is not None:
                from flowrun.api import ManagementApi

                self.api = ManagementApi(self, self.config.api.listen)
                await self.api.start()
            if self.start_triggers:
                await self._start_triggers()
        except BaseException:
            await self.stop()
            raise
        self.ready = True

    def _spec(self, name: str, fn: FunctionConfig) -> WorkerSpec:
        tmp_dir = self.state_dir / "tmp" / name
        tmp_dir.mkdir(parents=True, exist_ok=True)
        settings = fn.model_dump(mode="json")
        settings["tmp_dir"] = str(tmp_dir)
        settings["state_dir"] = str(self.state_dir)
        return WorkerSpec(
            function=name, handler=fn.handler, code_dir=fn.code, memory_mb=fn.memory_mb,
            timeout_s=fn.timeout_s, concurrency=fn.concurrency,
            environment=lambda_environment(name, fn, tmp_dir),
            python=fn.python or sys.executable, idle_timeout_s=fn.idle_timeout_s,
            spin_us=spin_us(fn),
            settings=settings,
        )

    async def _start_triggers(self) -> None:
        for trigger_config in self.config.triggers:
            if not trigger_config.enabled:
                continue
            cls = registry.load(trigger_config.type)
            trigger = cls(trigger_config, self)
            await trigger.start()
            self.triggers.append(trigger)
            log.info("trigger %s started", trigger.name)

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop triggers, let in-flight invocations finish within the grace, stop workers."""
        if not self._started:
            return
        self._started = False
        self.ready = False
        grace = self.config.shutdown_grace_s if grace_s is None else grace_s
        for trigger in reversed(self.triggers):
            try:
                await trigger.stop()
            except Exception:
                log.exception("trigger %s did not stop cleanly", trigger.name)
        self.triggers.clear()
        for callback in self._on_stop:
            with contextlib.suppress(Exception):
                await callback()
        self._on_stop.clear()
        if self.async_queue is not None:
            with contextlib.suppress(Exception):
                await self.async_queue.stop(grace)
        finished = await self.dispatcher.drain(grace)
        if not finished:
            log.warning("grace period of %.1f s over; stopping workers with work in flight", grace)
        if self.api is not None:
            await self.api.stop()
            self.api = None
        await self.pool.close()
        await self.destinations.close()
        self.ledger.close()
        self.log.close()

    async def __aenter__(self) -> Runtime:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    @property
    def stopping(self) -> bool:
        """True from the first moment of stop() (and before start())."""
        return not self._started

    def request_stop(self) -> None:
        if self._stop_requested is not None:
            self._stop_requested.set()

    async def serve(self) -> None:
        """Run until SIGTERM or SIGINT, then stop gracefully (what ``flowrun run`` does)."""
        loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop_requested.set)
        try:
            await self.start()
            await self._stop_requested.wait()
            for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal: do not wait
                loop.add_signal_handler(sig, self._stop_now)
            log.info("stopping: waiting up to %.0f s for in-flight invocations "
                     "(signal again to stop now)", self.config.shutdown_grace_s)
        finally:
            try:
                await self.stop()
            finally:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)

    def _stop_now(self) -> None:
        """A second SIGTERM/SIGINT during the grace period: kill the workers, so that the
        invocations in flight end now (as Runtime.ExitError) and the stop goes on."""
        log.warning("second signal: stopping now; invocations in flight are cut short")
        self.pool.kill_all()

    # ---------------------------------------------------------------- invocation

    async def invoke(self, name: str, event: Any = None, *, mode: InvocationMode = "sync",
                     source: str = "", request_id: str | None = None) -> InvocationResult:
        """Invoke ``name`` with a JSON-able event. ``mode="event"`` queues it durably."""
        event_json = "null" if event is None else json.dumps(event)
        if mode == "sync" and self._started:  # the common case, one coroutine less
            return await self.dispatcher.invoke(name, event_json, request_id=request_id,
                                                source=source)
        return await self.invoke_json(name, event_json, mode=mode, source=source,
                                      request_id=request_id)

    async def invoke_json(self, name: str, event_json: str | bytes, *,
                          mode: InvocationMode = "sync", source: str = "",
                          request_id: str | None = None) -> InvocationResult:
        if not self._started:
            raise FlowrunError("runtime is not started; use 'async with runtime' or start()")
        if mode == "event":
            if self.async_queue is None:
                raise FlowrunError("asynchronous invocation needs the durable queue")
            result: InvocationResult = await self.async_queue.enqueue(
                name, event_json, source=source, request_id=request_id or new_request_id())
            return result
        return await self.dispatcher.invoke(name, event_json, request_id=request_id,
                                            source=source)

    # ---------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        functions = {}
        for name, pool in self.pool.pools.items():
            stats = pool.statistics()
            gate = self.dispatcher.gates[name]
            functions[name] = {
                "workers": stats.workers, "idle": stats.idle, "busy": stats.busy,
                "cold_starts": stats.cold_starts, "invocations": stats.invocations,
                "waiting": gate.waiting, "throttles": self.dispatcher.throttles[name],
                "concurrency": gate.limit, "memory_mb": self.config.functions[name].memory_mb,
            }
            if self.async_queue is not None:
                functions[name].update(self.async_queue.status_fields(name))
            # cpus, pids_max, user, network as enforced here
            functions[name].update(self.pool.limiter.describe_function(pool.spec.settings))
        return {
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 1) if self.started_at else 0,
            "config": str(self.config.source) if self.config.source else None,
            "state_dir": str(self.state_dir),
            "limits": self.pool.limiter.describe(),
            "functions": functions,
            "pipelines": pipeline.describe(self.config, functions),
            "triggers": [{"name": t.name, "type": t.config.type, "function": t.config.function,
                          **t.status()} for t in self.triggers],
        }
