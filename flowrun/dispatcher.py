"""The dispatcher: per-function concurrency gates, throttling, and accounting hooks.

``invoke`` waits at the function's gate (at most ``concurrency`` running, at most
``queue_size`` waiting, the rest throttled), runs the invocation in the worker pool, turns
the worker's raw result into an ``InvocationResult`` with billed duration, and hands it to
every listener (ledger, log, metrics) before returning it.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from flowrun.config import BillingConfig, FunctionConfig
from flowrun.types import (
    SYNC_PAYLOAD_LIMIT_BYTES,
    InvocationResult,
    RequestTooLargeException,
    ResourceNotFoundException,
    TooManyRequestsException,
)
from sandbox.pool import RawResult, WorkerPool

Listener = Callable[[InvocationResult, str], None]


class Gate:
    """At most ``limit`` holders; up to ``queue_size`` waiters in arrival order; then refuse."""

    def __init__(self, limit: int, queue_size: int) -> None:
        self.limit = limit
        self.queue_size = queue_size
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._room: list[asyncio.Future[None]] = []

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def has_room(self) -> bool:
        return self.active < self.limit and not self._waiters

    def try_enter(self) -> bool:
        """Take a slot if one is free and nobody waits (no await: the common case)."""
        if self.active < self.limit and not self._waiters:
            self.active += 1
            return True
        return False

    async def enter(self) -> None:
        if self.try_enter():
            return
        if len(self._waiters) >= self.queue_size:
            raise TooManyRequestsException("Rate Exceeded.")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.leave()  # we were handed the slot just as we were cancelled
            else:
                self._waiters.remove(waiter)
            raise

    def leave(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # hand the slot over; active stays the same
                return
        self.active -= 1
        room, self._room = self._room, []
        for fut in room:
            if not fut.done():
                fut.set_result(None)

    async def wait_for_room(self) -> None:
        while not self.has_room():
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._room.append(fut)
            await fut

    async def drained(self, poll_s: float = 0.01) -> None:
        while self.active or self._waiters:
            await asyncio.sleep(poll_s)


def billed_ms(duration_ms: float, granularity_ms: int) -> int:
    """Round up to the billing granularity, at least one unit."""
    if duration_ms <= granularity_ms:
        return granularity_ms
    units = math.ceil(round(duration_ms, 6) / granularity_ms)
    return units * granularity_ms


_ID_PREFIX = str(uuid.uuid4())[:24]
_id_counter = itertools.count(int.from_bytes(os.urandom(5), "big"))


def new_request_id() -> str:
    """A UUID-shaped id: a random per-process prefix and a counter (unique, and cheap)."""
    return f"{_ID_PREFIX}{next(_id_counter) & 0xFFFFFFFFFFFF:012x}"


class Dispatcher:
    def __init__(self, functions: Mapping[str, FunctionConfig], pool: WorkerPool,
                 billing: BillingConfig) -> None:
        self.functions = dict(functions)
        self.pool = pool
        self.billing = billing
        self.gates = {name: Gate(fn.concurrency, fn.queue_size) for name, fn in functions.items()}
        self.listeners: list[Listener] = []
        self.throttles: dict[str, int] = dict.fromkeys(functions, 0)
        self.accepting = True

    def gate(self, name: str) -> Gate:
        try:
            return self.gates[name]
        except KeyError:
            raise ResourceNotFoundException(
                f"Function not found: {name}; defined: {', '.join(sorted(self.functions)) or 'none'}"
            ) from None

    async def invoke(self, name: str, event_json: str | bytes, *, request_id: str | None = None,
                     source: str = "", attempt: int = 1,
                     limit_bytes: int = SYNC_PAYLOAD_LIMIT_BYTES,
                     extra: Mapping[str, Any] | None = None) -> InvocationResult:
        gate = self.gate(name)
        function = self.functions[name]
        if len(event_json) > limit_bytes:
            raise RequestTooLargeException(
                f"Request must be smaller than {limit_bytes} bytes for the InvokeFunction operation"
            )
        request_id = request_id or new_request_id()
        if not self.accepting:
            raise TooManyRequestsException("flowrun is shutting down", reason="ShuttingDown")
        try:
            if not gate.try_enter():
                await gate.enter()
        except TooManyRequestsException:
            self.throttles[name] += 1
            self._emit(InvocationResult(request_id, name, "throttled",
                                        error_type="TooManyRequestsException",
                                        error_message="Rate Exceeded.",
                                        memory_size_mb=function.memory_mb,
                                        started_at=time.time(), attempt=attempt), source)
            raise
        started_at = time.time()
        try:
            raw = await self.pool.pools[name].invoke(request_id, event_json, extra=extra)
        finally:
            gate.leave()
        result = self._result(name, function, request_id, raw, started_at, attempt)
        self._emit(result, source)
        return result

    def _result(self, name: str, function: FunctionConfig, request_id: str, raw: RawResult,
                started_at: float, attempt: int) -> InvocationResult:
        duration_ms = raw.duration_ms
        billed = billed_ms(duration_ms, self.billing.granularity_ms)
        if raw.status == "success":
            return InvocationResult(request_id, name, "success", raw.payload_json, None, None, (),
                                    raw.logs, duration_ms, billed, raw.init_ms,
                                    function.memory_mb, raw.max_memory_mb, raw.cpu_user_ms,
                                    raw.cpu_system_ms, started_at, attempt)
        error = raw.error or {}
        error_type = error.get("errorType")
        memory = function.memory_mb if error_type == "Runtime.OutOfMemory" else raw.max_memory_mb
        return InvocationResult(
            request_id=request_id,
            function=name,
            status="timeout" if raw.status == "timeout" else "error",
            payload_json="null",
            error_type=error_type,
            error_message=error.get("errorMessage"),
            stack_trace=tuple(error.get("stackTrace") or ()),
            logs=raw.logs,
            duration_ms=duration_ms,
            billed_duration_ms=billed,
            init_duration_ms=raw.init_ms,
            memory_size_mb=function.memory_mb,
            max_memory_used_mb=memory,
            cpu_user_ms=raw.cpu_user_ms,
            cpu_system_ms=raw.cpu_system_ms,
            started_at=started_at,
            attempt=attempt,
        )

    def _emit(self, result: InvocationResult, source: str) -> None:
        for listener in self.listeners:
            listener(result, source)

    async def drain(self, grace_s: float) -> bool:
        """Stop accepting, wait up to ``grace_s`` for in-flight work; True if all finished."""
        self.accepting = False
        try:
            await asyncio.wait_for(
                asyncio.gather(*(g.drained() for g in self.gates.values())), grace_s)
        except TimeoutError:
            return False
        return True
