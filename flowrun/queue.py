"""The durable queue for asynchronous invocations: SQLite in ``state_dir/queue.db``.

``enqueue`` returns only once the invocation is committed to disk, so whoever acknowledges
its source afterwards (a trigger, the Invoke API's 202) never acknowledges something a crash
could lose. Concurrent enqueues are *group-committed*: a single writer thread commits every
operation that arrived while the previous commit was running in one transaction, then
resolves all their futures — thousands of durable enqueues per second from one fsync each.

fsync policy: the database is in WAL mode with ``synchronous=FULL`` by default, so a commit
is on stable storage when ``enqueue`` returns ("acknowledged means durable", also across a
power cut). ``synchronous="NORMAL"`` (an argument) skips the fsync per commit: a power cut
can then lose the last commits, but never corrupts the file; a killed process loses nothing
either way because the WAL is in the OS's page cache. ``benchmarks/bench_async.py``
measures both.

Rows move ``new`` → ``queued`` → ``inflight`` → deleted (success or final failure). ``new``
rows come from other processes (``flowrun invoke --async`` without a daemon, ``flowrun dlq
redrive``); the running queue picks them up every ``poll_interval_s``. At start every row
is loaded again — including rows left ``inflight`` by a daemon that was killed — so every
accepted invocation runs at least once. The request id stays the same on every attempt.

Dispatch takes work for a function only while its concurrency gate has room, so
asynchronous work never pushes synchronous callers into throttling. Function errors
(including timeouts, crashes and out-of-memory — as on Lambda) are retried ``retries`` times
after ``retry_backoff_s``; throttles and system errors are retried with exponential backoff
(1 s doubling up to 5 min) until the event is ``max_event_age_s`` old. An event past its
age goes to ``on_failure`` without running. Without ``on_failure`` failures go to the
dead-letter store (``flowrun/dlq.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import heapq
import json
import logging
import sqlite3
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from flowrun import dlq
from flowrun.config import FunctionConfig
from flowrun.types import (
    ASYNC_PAYLOAD_LIMIT_BYTES,
    FlowrunError,
    InvalidRequestContentException,
    InvocationResult,
    RequestTooLargeException,
    ResourceNotFoundException,
    ServiceUnavailableException,
    TooManyRequestsException,
)

log = logging.getLogger("flowrun.queue")

DB_NAME = "queue.db"
LOCK_NAME = "queue.lock"
SYSTEM_BACKOFF_S = 1.0
SYSTEM_BACKOFF_MAX_S = 300.0
DEFAULT_FUNCTION_BACKOFF_S = (60.0, 120.0)
REGION = "us-east-1"
ACCOUNT = "000000000000"

Synchronous = Literal["FULL", "NORMAL", "OFF"]
DEFAULT_SYNCHRONOUS: Synchronous = "FULL"  # the fsync policy above; benchmarks compare NORMAL
Condition = Literal["Success", "RetriesExhausted", "EventAgeExceeded"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (
    id INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL,
    function TEXT NOT NULL,
    event BLOB NOT NULL,
    source TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    enqueued_at REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    status TEXT NOT NULL,
    errors TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS queue_new ON queue (status) WHERE status = 'new';
"""

ROW = ("id, request_id, function, event, source, attempts, enqueued_at, next_attempt_at, "
       "errors")


def connect(path: Path, synchronous: Synchronous = "FULL") -> sqlite3.Connection:
    """Open (and create) the queue database: WAL, the given fsync policy, both tables."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA busy_timeout=10000")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    db.executescript(SCHEMA + dlq.SCHEMA)
    return db


def function_arn(name: str) -> str:
    return f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{name}:$LATEST"


def derived_request_id(request_id: str, destination: str) -> str:
    """The request id a destination's invocation gets: the same for every re-run of a step."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"flowrun:{request_id}:{destination}"))


def destination_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


@dataclass(slots=True)
class Item:
    """One queued invocation, mirrored in memory (the row is the truth across restarts)."""

    row_id: int
    request_id: str
    function: str
    event_json: str | bytes
    source: str
    attempts: int
    enqueued_at: float
    next_attempt_at: float
    errors: list[dict[str, Any]] = field(default_factory=list)

    def _this_round(self) -> list[dict[str, Any]]:
        """Errors since the last redrive (earlier ones are history, not used-up retries)."""
        for i in range(len(self.errors) - 1, -1, -1):
            if self.errors[i].get("kind") == "redrive":
                return self.errors[i + 1:]
        return self.errors

    def function_errors(self) -> int:
        return sum(1 for e in self._this_round() if e.get("kind") == "function")

    def system_errors(self) -> int:
        return sum(1 for e in self._this_round() if e.get("kind") in ("throttle", "system"))

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> Item:
        return cls(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7],
                   json.loads(row[8] or "[]"))


class Lane:
    """One function's share of the queue: ready items, delayed retries, counts."""

    def __init__(self) -> None:
        self.ready: deque[Item] = deque()
        self.delayed: list[tuple[float, int, Item]] = []
        self.inflight = 0
        self.pending = 0      # enqueues whose commit has not finished yet
        self.elsewhere = 0    # rows another process owns (when this queue does not dispatch)
        self.dead_letters = 0
        self.wakeup = asyncio.Event()

    def push(self, item: Item, now: float) -> None:
        if item.next_attempt_at > now:
            heapq.heappush(self.delayed, (item.next_attempt_at, item.row_id, item))
        else:
            self.ready.append(item)
        self.wakeup.set()

    def has_due(self, now: float) -> bool:
        return bool(self.ready) or bool(self.delayed and self.delayed[0][0] <= now)

    def take(self, now: float) -> Item | None:
        while self.delayed and self.delayed[0][0] <= now:
            self.ready.append(heapq.heappop(self.delayed)[2])
        return self.ready.popleft() if self.ready else None

    def next_due_s(self, now: float) -> float | None:
        return max(0.0, self.delayed[0][0] - now) if self.delayed else None

    def depth(self) -> int:
        return len(self.ready) + len(self.delayed) + self.inflight + self.pending + self.elsewhere

    def statistics(self) -> dict[str, int]:
        return {"queued": len(self.ready) + self.pending + self.elsewhere,
                "retrying": len(self.delayed), "inflight": self.inflight,
                "dead_letters": self.dead_letters}


# A callable run with the connection, or (sql, params): runs of the same sql become one
# executemany.
Op = Callable[[sqlite3.Connection], Any] | tuple[str, tuple[Any, ...]]


class Journal:
    """The single writer: ops queue up in memory; each commit takes all of them at once.

    Work someone waits for (``durable()``: an enqueue's acknowledgement) is committed at
    once. Bookkeeping nobody waits for (attempts started, invocations finished) waits up to
    ``lazy_window_s`` for company, so a busy queue spends fewer fsyncs on it; a crash in
    that window only means those invocations run once more.
    """

    def __init__(self, path: Path, synchronous: Synchronous, lazy_window_s: float = 0.005) -> None:
        self.path = path
        self.synchronous = synchronous
        self.lazy_window_s = lazy_window_s
        self.db: sqlite3.Connection | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flowrun-queue")
        self._ops: list[Op] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._after: list[Callable[[bool], None]] = []
        self._wake: asyncio.Event | None = None
        self._urgent: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.commits = 0
        self.ops_committed = 0

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self.db = await loop.run_in_executor(self._executor, connect, self.path,
                                             self.synchronous)
        self._wake = asyncio.Event()
        self._urgent = asyncio.Event()
        self._task = loop.create_task(self._run(), name="flowrun-queue-writer")

    async def call(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``fn(db)`` on the writer thread outside the batching (reads, loading)."""
        assert self.db is not None
        db = self.db
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, db)

    def add(self, op: Op, after: Callable[[bool], None] | None = None) -> None:
        """Queue ``op`` for the next commit; ``after(committed)`` runs on the loop after it."""
        self._ops.append(op)
        if after is not None:
            self._after.append(after)
        assert self._wake is not None
        self._wake.set()

    def durable(self) -> asyncio.Future[None]:
        """A future resolved once everything added so far is committed."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        assert self._wake is not None and self._urgent is not None
        self._wake.set()
        self._urgent.set()
        return waiter

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while True:
            if not self._ops and not self._waiters:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if not self._waiters and not self._closing and self.lazy_window_s > 0:
                assert self._urgent is not None
                self._urgent.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._urgent.wait(), self.lazy_window_s)
            ops, self._ops = self._ops, []
            waiters, self._waiters = self._waiters, []
            after, self._after = self._after, []
            error: BaseException | None = None
            try:
                if ops:
                    await loop.run_in_executor(self._executor, self._commit, ops)
                    self.commits += 1
                    self.ops_committed += len(ops)
            except Exception as exc:  # disk full, I/O error: callers hear about it
                log.exception("queue commit of %d operations failed", len(ops))
                error = exc
            for waiter in waiters:
                if waiter.done():
                    continue
                if error is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(ServiceUnavailableException(
                        f"the durable queue could not commit: {error}"))
            for callback in after:
                try:
                    callback(error is None)
                except Exception:
                    log.exception("queue callback failed")

    def _commit(self, ops: list[Op]) -> None:
        assert self.db is not None
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            sql: str | None = None
            rows: list[tuple[Any, ...]] = []
            for op in ops:
                if isinstance(op, tuple) and op[0] == sql:
                    rows.append(op[1])
                    continue
                if sql is not None:
                    db.executemany(sql, rows)
                sql, rows = None, []
                if isinstance(op, tuple):
                    sql, rows = op[0], [op[1]]
                else:
                    op(db)
            if sql is not None:
                db.executemany(sql, rows)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def close(self) -> None:
        self._closing = True
        if self._wake is not None and self._urgent is not None:
            self._wake.set()
            self._urgent.set()
        if self._task is not None:
            await self._task
            self._task = None
        if self.db is not None:
            db, self.db = self.db, None
            await asyncio.get_running_loop().run_in_executor(self._executor, db.close)
        self._executor.shutdown(wait=True)


class AsyncQueue:
    """Durable asynchronous invocation for one runtime (``runtime.async_queue``).

    ``dispatch=False`` makes a queue that only accepts work (``new`` rows) for whichever
    process runs the queue; it is also what a second process on the same state dir gets,
    since only one process at a time holds ``queue.lock``.
    """

    def __init__(self, runtime: Any, *, dispatch: bool = True,
                 synchronous: Synchronous | None = None, poll_interval_s: float = 0.25,
                 clock: Callable[[], float] = time.time) -> None:
        self.runtime = runtime
        self.functions: dict[str, FunctionConfig] = dict(runtime.config.functions)
        self.path = Path(runtime.state_dir) / DB_NAME
        self.dispatch = dispatch
        self.poll_interval_s = poll_interval_s
        self.clock = clock
        self.journal = Journal(self.path, synchronous or DEFAULT_SYNCHRONOUS)
        self.lanes = {name: Lane() for name in self.functions}
        self.accepting = False
        self.succeeded = 0
        self.failed = 0
        self._lock_file: IO[bytes] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._consumers: list[asyncio.Task[None]] = []
        self._idle: set[asyncio.Task[None]] = set()
        self._stopping = False

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        await self.journal.open()
        if self.dispatch and not self._lock():
            log.warning("another process runs the queue in %s; this one only queues work",
                        self.path.parent)
            self.dispatch = False
        if self.dispatch:
            await self._load()
            loop = asyncio.get_running_loop()
            for name, fn in self.functions.items():
                self._consumers.extend(loop.create_task(self._consume(name), name=f"queue:{name}")
                                       for _ in range(fn.concurrency))
            self._tasks.append(loop.create_task(self._poll_forever(), name="queue:poll"))
        else:
            for name, count in (await self.journal.call(_counts_by_function)).items():
                if name in self.lanes:
                    self.lanes[name].elsewhere = count
        self.accepting = True

    def _lock(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path.parent / LOCK_NAME, "ab")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        self._lock_file = handle
        return True

    async def _load(self) -> None:
        """Everything on disk runs: queued rows, retries, and rows a killed daemon left."""
        rows, letters = await self.journal.call(_load_rows)
        now = self.clock()
        interrupted: list[int] = []
        unknown: list[Item] = []
        for row, status in rows:
            item = Item.from_row(row)
            if item.function not in self.lanes:
                unknown.append(item)
                continue
            if status == "inflight":
                interrupted.append(item.row_id)
                item.errors.append({"kind": "interrupted", "attempt": item.attempts,
                                    "at": dlq.iso(now), "errorType": "Flowrun.Interrupted",
                                    "errorMessage": "the daemon stopped while this attempt "
                                                    "was in flight; running it again"})
                item.next_attempt_at = now
            self.lanes[item.function].push(item, now)
        for name, count in letters.items():
            if name in self.lanes:
                self.lanes[name].dead_letters = count
        for item in unknown:
            log.error("queued invocation %s names function %r, which is no longer defined; "
                      "moving it to the dead letters", item.request_id, item.function)
            item.errors.append({"kind": "system", "at": dlq.iso(now),
                                "errorType": "ResourceNotFoundException",
                                "errorMessage": f"Function not found: {item.function}"})
            self._dead_letter(item, "RetriesExhausted", None, now)
        if interrupted:
            log.warning("running %d invocations again that were in flight when flowrun "
                        "last stopped", len(interrupted))

    async def stop(self, grace_s: float) -> None:
        """Take no new work; let in-flight attempts finish within ``grace_s``; keep the rest."""
        self.accepting = False
        self._stopping = True
        for task in [*self._tasks, *self._idle]:
            task.cancel()
        busy = [task for task in self._consumers if not task.done()]
        if busy:
            _, late = await asyncio.wait(busy, timeout=grace_s)
            if late:
                log.warning("%d asynchronous invocations still running after %.1f s; they "
                            "stay queued and run again at the next start", len(late), grace_s)
                for task in late:
                    task.cancel()
        for task in [*self._tasks, *self._consumers]:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        self._consumers.clear()
        await self.journal.close()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    # ---------------------------------------------------------------- enqueue

    async def enqueue(self, name: str, event_json: str | bytes, *, source: str = "",
                      request_id: str | None = None, enqueued_at: float | None = None,
                      bounded: bool = True) -> InvocationResult:
        """Write the invocation durably, then return a result marking it accepted (202).

        Raises ``TooManyRequestsException`` when the function's ``async_queue_size`` is
        reached (``bounded=False`` — destinations chaining steps — skips the bound),
        ``ResourceNotFoundException`` and ``RequestTooLargeException`` like Lambda.
        """
        if isinstance(event_json, bytes):
            try:
                event_json = event_json.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidRequestContentException(
                    f"Could not parse request body into json: {exc}") from None
        fn = self.functions.get(name)
        if fn is None:
            raise ResourceNotFoundException(
                f"Function not found: {name}; defined: {', '.join(sorted(self.functions))}")
        if len(event_json) > ASYNC_PAYLOAD_LIMIT_BYTES:
            raise RequestTooLargeException(
                f"Request must be smaller than {ASYNC_PAYLOAD_LIMIT_BYTES} bytes for the "
                "InvokeAsync operation")
        if not self.accepting and (bounded or self.journal.db is None):
            raise TooManyRequestsException("flowrun is shutting down", reason="ShuttingDown")
        lane = self.lanes[name]
        if bounded and lane.depth() >= fn.async_queue_size:
            self.runtime.dispatcher.throttles[name] += 1
            raise TooManyRequestsException(
                f"Rate Exceeded: the asynchronous queue of {name} holds "
                f"{fn.async_queue_size} invocations (async_queue_size)",
                reason="AsyncQueueFull")
        now = self.clock()
        item = Item(0, request_id or str(uuid.uuid4()), name, event_json, source, 0,
                    now if enqueued_at is None else enqueued_at, now)
        status = "queued" if self.dispatch else "new"

        def insert(db: sqlite3.Connection) -> None:
            cursor = db.execute(
                "INSERT INTO queue (request_id, function, event, source, attempts, enqueued_at, "
                "next_attempt_at, status) VALUES (?, ?, ?, ?, 0, ?, ?, ?)",
                (item.request_id, name, event_json, source, item.enqueued_at,
                 item.next_attempt_at, status))
            item.row_id = int(cursor.lastrowid or 0)

        def committed(ok: bool) -> None:
            lane.pending -= 1
            if not ok:
                return
            if self.dispatch:
                lane.push(item, self.clock())
            else:
                lane.elsewhere += 1

        lane.pending += 1
        self.journal.add(insert, committed)
        await self.journal.durable()
        return InvocationResult(request_id=item.request_id, function=name, status="success",
                                payload_json="null", started_at=now,
                                extra={"accepted": True, "status_code": 202,
                                       "enqueued_at": item.enqueued_at})

    # ---------------------------------------------------------------- dispatch

    async def _consume(self, name: str) -> None:
        """One of ``concurrency`` consumers of a function's queue.

        A consumer takes an item only while the function's gate has room, and runs it to the
        end (destinations included) before it takes the next, so the queue never holds more
        than ``concurrency`` slots and never makes synchronous callers wait behind it.
        """
        lane = self.lanes[name]
        gate = self.runtime.dispatcher.gate(name)
        fn = self.functions[name]
        task = asyncio.current_task()
        assert task is not None
        while not self._stopping:
            self._idle.add(task)
            try:
                item = await self._next(lane, gate)
            finally:
                self._idle.discard(task)
            now = self.clock()
            if now - item.enqueued_at > fn.max_event_age_s:
                await self._finish_failed(item, "EventAgeExceeded", None, now)
                continue
            item.attempts += 1
            self.journal.add(("UPDATE queue SET status = 'inflight', attempts = ? WHERE id = ?",
                              (item.attempts, item.row_id)))
            await self._attempt(lane, item)

    async def _next(self, lane: Lane, gate: Any) -> Item:
        """Wait for an item that is due, then for room at the gate, then take it (when
        another consumer took it meanwhile, wait again). Waiting for work first keeps idle
        consumers asleep while synchronous invocations come and go through the gate."""
        while True:
            now = self.clock()
            if lane.has_due(now):
                await gate.wait_for_room()
                item = lane.take(self.clock())
                if item is not None:
                    return item
                continue
            lane.wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lane.wakeup.wait(), lane.next_due_s(now))

    async def _attempt(self, lane: Lane, item: Item) -> None:
        name = item.function
        lane.inflight += 1
        try:
            result = await self.runtime.dispatcher.invoke(
                name, item.event_json, request_id=item.request_id,
                source=item.source or "async", attempt=item.attempts,
                limit_bytes=ASYNC_PAYLOAD_LIMIT_BYTES)
        except TooManyRequestsException as exc:
            if exc.reason == "ShuttingDown":
                return  # stays in flight on disk; runs again at the next start
            self._retry_later(item, "throttle", exc.error_type, str(exc))
        except FlowrunError as exc:
            self._retry_later(item, "system", exc.error_type, str(exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the worker could not start, the pipe broke: not the function
            log.warning("asynchronous invocation %s of %s failed in flowrun (%s: %s); retrying "
                        "with backoff", item.request_id, name, type(exc).__name__, exc)
            self._retry_later(item, "system", type(exc).__name__, str(exc))
        else:
            if result.ok:
                await self._finish_succeeded(item, result)
            else:
                await self._function_error(item, result)
        finally:
            lane.inflight -= 1

    def _error_entry(self, item: Item, kind: str, error_type: str | None,
                     message: str | None, **more: Any) -> dict[str, Any]:
        return {"kind": kind, "attempt": item.attempts, "at": dlq.iso(self.clock()),
                "errorType": error_type, "errorMessage": message, **more}

    def _retry_later(self, item: Item, kind: str, error_type: str, message: str) -> None:
        """Throttles and system errors: back off exponentially; the event age is the limit."""
        item.attempts -= 1  # the function did not run
        item.errors.append(self._error_entry(item, kind, error_type, message))
        delay_s = min(SYSTEM_BACKOFF_S * 2 ** (item.system_errors() - 1), SYSTEM_BACKOFF_MAX_S)
        self._reschedule(item, delay_s)

    async def _function_error(self, item: Item, result: InvocationResult) -> None:
        item.errors.append(self._error_entry(item, "function", result.error_type,
                                             result.error_message,
                                             stackTrace=list(result.stack_trace)))
        fn = self.functions[item.function]
        failures = item.function_errors()
        if failures > fn.retries:
            await self._finish_failed(item, "RetriesExhausted", result, self.clock())
            return
        backoff = tuple(fn.retry_backoff_s or DEFAULT_FUNCTION_BACKOFF_S)
        delay_s = backoff[min(failures, len(backoff)) - 1]
        log.info("%s %s failed (attempt %d: %s); retry in %.3g s", item.function,
                 item.request_id, item.attempts, result.error_type, delay_s)
        self._reschedule(item, delay_s)

    def _reschedule(self, item: Item, delay_s: float) -> None:
        now = self.clock()
        item.next_attempt_at = now + delay_s
        values = (item.attempts, item.next_attempt_at, json.dumps(item.errors), item.row_id)
        self.journal.add(("UPDATE queue SET status = 'queued', attempts = ?, "
                          "next_attempt_at = ?, errors = ? WHERE id = ?", values))
        if not self._stopping:
            self.lanes[item.function].push(item, now)

    # ---------------------------------------------------------------- outcomes

    async def _finish_succeeded(self, item: Item, result: InvocationResult) -> None:
        self.succeeded += 1
        fn = self.functions[item.function]
        targets = destination_list(fn.on_success)
        if targets:
            record = self.record(item, "Success", result)
            await self._deliver(item, targets, record, result)
        self._delete(item)

    async def _finish_failed(self, item: Item, condition: Condition,
                             result: InvocationResult | None, now: float) -> None:
        self.failed += 1
        fn = self.functions[item.function]
        targets = destination_list(fn.on_failure) or ["dlq"]
        record = self.record(item, condition, result)
        if targets == ["dlq"]:
            self._dead_letter(item, condition, record, now)
            return
        await self._deliver(item, targets, record, result)
        self._delete(item)

    async def _deliver(self, item: Item, targets: list[str], record: dict[str, Any],
                       result: InvocationResult | None) -> None:
        """Send the record to every target; a target that fails gets a dead letter instead."""
        for target in targets:
            if target == "dlq":
                self._dead_letter(item, record["requestContext"]["condition"], record,
                                  self.clock(), keep_row=True)
                continue
            try:
                await self.runtime.destinations.send(target, record)
            except Exception as exc:
                log.exception("destination %s of %s failed; keeping a dead letter", target,
                              item.function)
                entry = self._error_entry(item, "destination", type(exc).__name__, str(exc),
                                          destination=target)
                letter = Item(item.row_id, item.request_id, item.function, item.event_json,
                              item.source, item.attempts, item.enqueued_at,
                              item.next_attempt_at, [*item.errors, entry])
                self._dead_letter(letter, record["requestContext"]["condition"], record,
                                  self.clock(), keep_row=True)

    def _delete(self, item: Item) -> None:
        row_id = item.row_id
        self.journal.add(("DELETE FROM queue WHERE id = ?", (row_id,)))

    def _dead_letter(self, item: Item, condition: str, record: dict[str, Any] | None,
                     now: float, keep_row: bool = False) -> None:
        """Move (or, with ``keep_row``, copy) the invocation into the dead-letter store."""
        errors = list(item.errors)
        lane = self.lanes.get(item.function)

        def counted(ok: bool) -> None:
            if ok and lane is not None:
                lane.dead_letters += 1

        def op(db: sqlite3.Connection) -> None:
            dlq.add(db, request_id=item.request_id, function=item.function,
                    event_json=item.event_json, source=item.source, condition=condition,
                    attempts=item.attempts, errors=errors, enqueued_at=item.enqueued_at,
                    failed_at=now, record=record)
            if not keep_row:
                db.execute("DELETE FROM queue WHERE id = ?", (item.row_id,))

        self.journal.add(op, counted)

    async def keep_dead_letter(self, **letter: Any) -> None:
        """Store a dead letter that did not come from this queue (``dlq`` destinations)."""
        lane = self.lanes.get(str(letter.get("function")))

        def counted(ok: bool) -> None:
            if ok and lane is not None:
                lane.dead_letters += 1

        self.journal.add(lambda db: dlq.add(db, **letter), counted)
        await self.journal.durable()

    def record(self, item: Item, condition: Condition,
               result: InvocationResult | None) -> dict[str, Any]:
        """Lambda's asynchronous invocation record, as destinations receive it."""
        try:
            payload: Any = json.loads(item.event_json)
        except ValueError:
            payload = item.event_json if isinstance(item.event_json, str) else None
        record: dict[str, Any] = {
            "version": "1.0",
            "timestamp": dlq.iso(self.clock()),
            "requestContext": {
                "requestId": item.request_id,
                "functionArn": function_arn(item.function),
                "condition": condition,
                "approximateInvokeCount": item.attempts,
            },
            "requestPayload": payload,
        }
        if result is not None:
            context: dict[str, Any] = {"statusCode": 200, "executedVersion": "$LATEST"}
            if not result.ok:
                context["functionError"] = "Unhandled"
            record["responseContext"] = context
            record["responsePayload"] = result.payload if result.ok else result.error
        return record

    # ---------------------------------------------------------------- new rows

    async def _poll_forever(self) -> None:
        """Pick up rows other processes added (``new``) and refresh dead-letter counts."""
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                rows, letters = await self.journal.call(_claim_new)
            except sqlite3.Error:
                log.exception("could not read new queue rows")
                continue
            now = self.clock()
            for row in rows:
                item = Item.from_row(row)
                if item.function in self.lanes:
                    self.lanes[item.function].push(item, now)
                else:
                    self._dead_letter(item, "RetriesExhausted", None, now)
            for name, lane in self.lanes.items():
                lane.dead_letters = letters.get(name, 0)

    async def flush(self) -> None:
        """Wait until every write so far is committed (tests, benchmarks)."""
        await self.journal.durable()

    # ---------------------------------------------------------------- status

    def has_room(self, name: str) -> bool:
        """True while ``name``'s queue is below ``async_queue_size`` (event-mode triggers)."""
        return self.lanes[name].depth() < self.functions[name].async_queue_size

    def depth(self, name: str) -> dict[str, int]:
        return self.lanes[name].statistics()

    def status_fields(self, name: str) -> dict[str, int]:
        """``flowrun status`` columns for one function."""
        stats = self.lanes[name].statistics()
        return {"async_queued": stats["queued"], "async_retrying": stats["retrying"],
                "async_inflight": stats["inflight"], "dead_letters": stats["dead_letters"]}

    def statistics(self) -> dict[str, Any]:
        return {"dispatching": self.dispatch, "succeeded": self.succeeded,
                "failed": self.failed, "commits": self.journal.commits,
                "functions": {name: lane.statistics() for name, lane in self.lanes.items()}}


def _counts_by_function(db: sqlite3.Connection) -> dict[str, int]:
    return dict(db.execute("SELECT function, count(*) FROM queue GROUP BY function"))


def _load_rows(db: sqlite3.Connection) -> tuple[list[tuple[tuple[Any, ...], str]],
                                                 dict[str, int]]:
    db.execute("BEGIN IMMEDIATE")
    try:
        rows = [(row[:-1], row[-1]) for row in
                db.execute(f"SELECT {ROW}, status FROM queue ORDER BY id")]
        db.execute("UPDATE queue SET status = 'queued' WHERE status = 'new'")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return rows, dlq.counts(db)


def _claim_new(db: sqlite3.Connection) -> tuple[list[tuple[Any, ...]], dict[str, int]]:
    rows: list[tuple[Any, ...]] = []
    if db.execute("SELECT 1 FROM queue WHERE status = 'new' LIMIT 1").fetchone():
        db.execute("BEGIN IMMEDIATE")
        try:
            rows = list(db.execute(f"SELECT {ROW} FROM queue WHERE status = 'new' ORDER BY id"))
            db.executemany("UPDATE queue SET status = 'queued' WHERE id = ?",
                           [(row[0],) for row in rows])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    return rows, dlq.counts(db)


def pending_counts(state_dir: Path,
                   functions: Iterable[str] = ()) -> dict[str, dict[str, int]]:
    """Queue and dead-letter counts per function read from disk (no daemon needed)."""
    out: dict[str, dict[str, int]] = {name: {"async_queued": 0, "dead_letters": 0}
                                      for name in functions}
    path = Path(state_dir) / DB_NAME
    if not path.exists():
        return out
    db = connect(path)
    try:
        for name, count in db.execute("SELECT function, count(*) FROM queue GROUP BY function"):
            out.setdefault(name, {"async_queued": 0, "dead_letters": 0})["async_queued"] = count
        for name, count in dlq.counts(db).items():
            out.setdefault(name, {"async_queued": 0, "dead_letters": 0})["dead_letters"] = count
        return out
    finally:
        db.close()
