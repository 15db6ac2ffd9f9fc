"""The file trigger: an S3 event notification for every settled file version in a folder.

A watchdog observer thread reports changes; they are handed to the event loop with
``call_soon_threadsafe``. A file counts once its size and mtime have stayed unchanged for
``settle_ms`` (so a file still being written never triggers), and a periodic rescan catches
anything the observer missed. Each version (key, size, mtime_ns, md5) is invoked once:
the processed-version index lives in SQLite at ``state_dir/files.db`` and a version is
marked done only after its invocation succeeded (or was accepted for asynchronous
invocation), so a restart neither repeats nor loses files.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import enum
import fnmatch
import hashlib
import logging
import os
import socket
import sqlite3
import stat
import time
import uuid
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote_plus

from pydantic import Field, field_validator
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from flowrun.ledger import connect
from flowrun.types import FlowrunError, InvocationResult, TooManyRequestsException
from triggers.base import Trigger, TriggerConfig, TriggerHost

log = logging.getLogger("flowrun.triggers.file")

DEFAULT_IGNORE_PATTERNS = (
    ".*",  # hidden files: .name.swp (vim), .#name (emacs lock), .~lock.name# (LibreOffice)
    "*~",  # backup copies
    "#*#",  # emacs auto-save
    "*.swp", "*.swx", "*.swo",
    "*.tmp", "*.temp",
    "*.part", "*.partial", "*.crdownload", "*.download",
    "~$*",  # MS Office owner files
)
THROTTLE_BACKOFF_S = 0.2
HASH_CHUNK_BYTES = 1024 * 1024
MAX_IN_FLIGHT = 64  # deliveries running at once (invoking, retrying or being throttled)
PRUNE_EVERY_S = 3600.0  # the index forgets history it will not read again, hourly


class FileTriggerConfig(TriggerConfig):
    path: str = Field(description="folder to watch, relative to the config file's folder")
    patterns: list[str] = Field(["*"], min_length=1,
                                description="file names (or relative paths) to take")
    ignore_patterns: list[str] = Field(
        list(DEFAULT_IGNORE_PATTERNS),
        description="names to skip; matched against every path component (editor temp files)")
    recursive: bool = Field(False, description="watch sub-folders too")
    events: list[Literal["created", "removed"]] = Field(["created"], min_length=1)
    settle_ms: int = Field(500, ge=0, le=3_600_000,
                           description="size and mtime must stay unchanged this long")
    rescan_s: float = Field(5.0, gt=0, le=3600,
                            description="full rescan period, in case an event was missed")
    bucket: str | None = Field(None, description="s3.bucket.name; default the folder's name")
    region: str = Field("us-east-1", description="awsRegion of the records")
    invocation: Literal["sync", "event"] = Field(
        "event", description="event (default, as on Lambda) hands it to the durable queue, which "
                             "retries and routes failures; sync waits for the result")
    retries: int = Field(2, ge=0, le=100,
                         description="retries of a failed invocation before the version is failed")
    retry_backoff_s: float = Field(1.0, ge=0, le=3600,
                                   description="first retry delay; doubles on each retry")

    @field_validator("events")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))


class Kind(enum.StrEnum):
    CREATED = "created"
    REMOVED = "removed"


@dataclass(frozen=True, slots=True)
class Observation:
    """What ``stat`` says about a file; a change in any field restarts the settle clock."""

    size: int
    mtime_ns: int
    inode: int


@dataclass(frozen=True, slots=True)
class FileVersion:
    key: str  # the path relative to the folder, with "/" separators, not URL-encoded
    size: int
    mtime_ns: int
    etag: str


@dataclass(frozen=True, slots=True)
class Job:
    kind: Kind
    version: FileVersion
    request_id: str


@dataclass(frozen=True, slots=True)
class FileTriggerStatistics:
    state: str
    path: str
    seen: int
    invoked: int
    pending: int
    failed: int
    retries: int
    scans: int
    watching: bool
    invocation: str
    last_error: str | None
    pruned: int = 0  # index rows forgotten as history nothing reads again


def observe(path: Path) -> Observation | None:
    """The file's observation, or None if it is not (any more) a regular file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return Observation(st.st_size, st.st_mtime_ns, st.st_ino)


def md5_hex(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def s3_key(relative: str) -> str:
    """Encode a key as S3 does in notifications: spaces as '+', '/' kept, UTF-8 escaped."""
    return quote_plus(relative, safe="/")


def iso_time(epoch_s: float) -> str:
    moment = dt.datetime.fromtimestamp(epoch_s, tz=dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def s3_event(*, kind: Kind, version: FileVersion, bucket: str, region: str, sequencer: str,
             request_id: str, configuration_id: str, path: Path,
             event_time_s: float | None = None) -> dict[str, Any]:
    """One S3 event notification (version 2.1) for ``version`` of a local file."""
    obj: dict[str, Any] = {"key": s3_key(version.key)}
    if kind is Kind.CREATED:  # S3 sends no size or eTag for deletes
        obj.update(size=version.size, eTag=version.etag)
    obj["sequencer"] = sequencer
    record = {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": region,
        "eventTime": iso_time(time.time() if event_time_s is None else event_time_s),
        "eventName": "ObjectCreated:Put" if kind is Kind.CREATED else "ObjectRemoved:Delete",
        "userIdentity": {"principalId": "flowrun"},
        "requestParameters": {"sourceIPAddress": "127.0.0.1"},
        "responseElements": {"x-amz-request-id": request_id[:16].upper(),
                             "x-amz-id-2": socket.gethostname()},
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": configuration_id,
            "bucket": {"name": bucket, "ownerIdentity": {"principalId": "flowrun"},
                       "arn": f"arn:aws:s3:::{bucket}"},
            "object": obj,
        },
        "flowrun": {"path": str(path), "key": version.key, "size": version.size,
                    "mtime_ns": version.mtime_ns, "etag": version.etag},
    }
    return {"Records": [record]}


class ProcessedIndex:
    """Which file versions a trigger has handled: SQLite (WAL) rows keyed by version.

    ``status`` is pending (queued, not finished: retried after a restart), done, failed
    (retries exhausted), skipped (seen, but its kind of event is not configured) or
    superseded (pending at a restart, but the file had changed or gone by then).
    """

    SCHEMA = """
    CREATE TABLE IF NOT EXISTS versions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        scope TEXT NOT NULL,
        key TEXT NOT NULL,
        kind TEXT NOT NULL,
        size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        etag TEXT NOT NULL,
        status TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        error TEXT,
        request_id TEXT,
        updated_at REAL NOT NULL,
        UNIQUE (scope, key, kind, size, mtime_ns, etag)
    );
    CREATE INDEX IF NOT EXISTS versions_by_key ON versions (scope, key);
    """
    FINISHED = ("done", "failed", "skipped")

    def __init__(self, path: Path, scope: str) -> None:
        self.path = path
        self.scope = scope
        self._db: sqlite3.Connection | None = None

    def open(self) -> None:
        db = connect(self.path)
        db.execute("PRAGMA busy_timeout=30000")
        db.executescript(self.SCHEMA)
        self._db = db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the file index is not open")
        return self._db

    def finished(self, key: str, obs: Observation) -> FileVersion | None:
        """The version of ``key`` last handled, when it is this size and mtime and was not
        removed since. Only the newest finished row counts (what ``prune`` keeps): an
        older version put back, or a removed file back again, is a new object, as on S3,
        before a restart as after one."""
        row = self.db.execute(
            "SELECT kind, size, mtime_ns, etag FROM versions WHERE scope=? AND key=?"
            " AND status IN ('done', 'failed', 'skipped') ORDER BY id DESC LIMIT 1",
            (self.scope, key)).fetchone()
        if row is None or row[0] != Kind.CREATED.value or (row[1], row[2]) != (
                obs.size, obs.mtime_ns):
            return None
        return FileVersion(key, obs.size, obs.mtime_ns, row[3])

    def record(self, kind: Kind, version: FileVersion, status: str, *, attempts: int = 0,
               error: str | None = None, request_id: str | None = None) -> None:
        """Insert or update a version's row; its id (the order of first sight) is kept."""
        self.db.execute(
            "INSERT INTO versions (scope, key, kind, size, mtime_ns, etag, status, attempts,"
            " error, request_id, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (scope, key, kind, size, mtime_ns, etag) DO UPDATE SET"
            " status=excluded.status, attempts=excluded.attempts, error=excluded.error,"
            " request_id=COALESCE(excluded.request_id, request_id),"
            " updated_at=excluded.updated_at",
            (self.scope, version.key, kind.value, version.size, version.mtime_ns, version.etag,
             status, attempts, error, request_id, time.time()))

    def unfinished(self) -> Iterator[tuple[Kind, FileVersion]]:
        rows = self.db.execute(
            "SELECT kind, key, size, mtime_ns, etag FROM versions WHERE scope=?"
            " AND status='pending' ORDER BY id", (self.scope,)).fetchall()
        for kind, key, size, mtime_ns, etag in rows:
            yield Kind(kind), FileVersion(key, size, mtime_ns, etag)

    def prune(self) -> int:
        """Forget history nothing reads again; returns the rows deleted.

        Per key only the newest finished row is read (``latest``, ``finished``), so older
        finished rows and every superseded row go; a key whose newest finished row is a
        removal goes altogether (the object is gone; a file of that name later is a new
        one, as on S3). A key with a pending row keeps everything until it is finished.
        Runs on its own connection (``asyncio.to_thread`` it: it can take a second on a
        big index)."""
        finished = "status IN ('done', 'failed', 'skipped')"
        busy = "key NOT IN (SELECT key FROM versions WHERE scope=:s AND status='pending')"
        newest = f"SELECT MAX(id) FROM versions WHERE scope=:s AND {finished} GROUP BY key"
        db = connect(self.path)
        db.execute("PRAGMA busy_timeout=30000")
        try:
            with db:
                superseded = db.execute(
                    "DELETE FROM versions WHERE scope=:s AND status='superseded'",
                    {"s": self.scope}).rowcount
                older = db.execute(
                    f"DELETE FROM versions WHERE scope=:s AND {finished} AND {busy}"
                    f" AND id NOT IN ({newest})", {"s": self.scope}).rowcount
                removed = db.execute(
                    f"DELETE FROM versions WHERE scope=:s AND {busy} AND key IN (SELECT key"
                    f" FROM versions WHERE kind='removed' AND id IN ({newest}))",
                    {"s": self.scope}).rowcount
        finally:
            db.close()
        return superseded + older + removed

    def latest(self) -> dict[str, tuple[Kind, FileVersion]]:
        """Per key, the last version handled and whether it was created or removed."""
        rows = self.db.execute(
            "SELECT kind, key, size, mtime_ns, etag FROM versions WHERE scope=?"
            " AND status IN ('done', 'failed', 'skipped') ORDER BY id",
            (self.scope,)).fetchall()
        return {key: (Kind(kind), FileVersion(key, size, mtime_ns, etag))
                for kind, key, size, mtime_ns, etag in rows}


class _Forwarder(FileSystemEventHandler):
    """Runs in watchdog's observer thread: hands every event to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, trigger: FileTrigger) -> None:
        self.loop = loop
        self.trigger = trigger

    def on_any_event(self, event: FileSystemEvent) -> None:
        src = os.fsdecode(event.src_path)
        dest = os.fsdecode(event.dest_path) if event.dest_path else ""
        with contextlib.suppress(RuntimeError):  # the loop is closed: we are stopping
            self.loop.call_soon_threadsafe(self.trigger.on_fs_event, event.event_type, src,
                                           dest, event.is_directory)


class FileTrigger(Trigger):
    """Invokes the function with an S3 event notification per settled file version."""

    config_model = FileTriggerConfig
    config: FileTriggerConfig

    def __init__(self, config: TriggerConfig, host: TriggerHost) -> None:
        if not isinstance(config, FileTriggerConfig):
            config = FileTriggerConfig.model_validate(config.model_dump())
        super().__init__(config, host)
        self.folder = (host.config_dir / config.path).resolve()
        self.bucket = config.bucket or self.folder.name or "flowrun"
        self.index = ProcessedIndex(host.state_dir / "files.db", f"{self.name}|{self.folder}")
        self.settle_s = config.settle_ms / 1000
        self.tick_s = min(max(self.settle_s / 4, 0.02), 0.25)
        self.mode: Literal["sync", "event"] = config.invocation
        self.state = "stopped"
        self._observer: Any = None
        self._settling: dict[str, tuple[Observation, float]] = {}
        self._hashing: set[str] = set()
        self._unreadable_keys: set[str] = set()
        self.watching = False  # False: the OS watch failed, only rescans find files
        self._known: dict[str, tuple[Observation, FileVersion]] = {}
        self._queued: set[tuple[Kind, FileVersion]] = set()
        self._jobs: asyncio.Queue[Job] = asyncio.Queue()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._deliveries: set[asyncio.Task[Any]] = set()
        self._in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._settle_wake = asyncio.Event()
        self._rescan_wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._last_sequencer = 0
        self._counts = {"seen": 0, "invoked": 0, "failed": 0, "retries": 0, "scans": 0,
                        "pruned": 0}
        self._pruned_at = 0.0
        self._last_error: str | None = None

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self.state = "starting"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.index.open()
        try:
            self._watch()
            self._resume_unfinished()
            snapshot = await asyncio.to_thread(self._scan)
            self._apply_scan(snapshot)
            self._removed_while_away(snapshot)
            await self._prune()
        except BaseException:
            await self._shutdown(grace_s=0)
            raise
        self._spawn(self._settle_loop())
        self._spawn(self._rescan_loop())
        self._spawn(self._job_loop())
        self.state = "running"

    def _watch(self) -> None:
        """Start the observer thread; without it (inotify limits reached) rely on rescans."""
        observer = Observer()
        try:
            observer.schedule(_Forwarder(asyncio.get_running_loop(), self), str(self.folder),
                              recursive=self.config.recursive)
            observer.daemon = True
            observer.start()
        except OSError as exc:
            self._last_error = f"cannot watch {self.folder}: {exc}"
            log.warning("file trigger %s: cannot watch %s (%s); finding files by rescanning "
                        "every %.1f s only", self.name, self.folder, exc, self.config.rescan_s)
            if observer.is_alive():
                observer.stop()
                observer.join(10)
            return
        self._observer = observer
        self.watching = True

    async def stop(self) -> None:
        await self._shutdown(grace_s=self._grace_s())

    def _grace_s(self) -> float:
        config = getattr(self.host, "config", None)
        return float(getattr(config, "shutdown_grace_s", 30.0))

    async def _shutdown(self, grace_s: float) -> None:
        """Stop the observer, let running invocations finish (within ``grace_s``), close."""
        self.state = "stopping"
        self._stopping.set()
        if self._observer is not None:
            observer, self._observer = self._observer, None
            observer.stop()
            await asyncio.to_thread(observer.join, 10)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._deliveries:
            await asyncio.wait(self._deliveries, timeout=grace_s)
            for task in self._deliveries:
                task.cancel()
            await asyncio.gather(*self._deliveries, return_exceptions=True)
        self.index.close()
        self.state = "stopped"

    def _spawn(self, coro: Coroutine[Any, Any, None], group: set[asyncio.Task[Any]] | None = None
               ) -> None:
        tasks = self._tasks if group is None else group
        task = asyncio.get_running_loop().create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        task.add_done_callback(self._log_crash)

    def _log_crash(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            self._last_error = f"{type(exc).__name__}: {exc}"
            log.error("file trigger %s: internal error", self.name, exc_info=exc)

    # ---------------------------------------------------------------- what to watch

    def relative(self, path: str) -> str | None:
        """The key of ``path`` if this trigger takes it, else None."""
        try:
            rel = Path(path).relative_to(self.folder).as_posix()
        except ValueError:
            return None
        return rel if rel != "." and self.wanted(rel) else None

    def wanted(self, rel: str) -> bool:
        parts = rel.split("/")
        if len(parts) > 1 and not self.config.recursive:
            return False
        if any(fnmatch.fnmatchcase(part, pattern)
               for part in parts for pattern in self.config.ignore_patterns):
            return False
        name = parts[-1]
        return any(fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(rel, pattern)
                   for pattern in self.config.patterns)

    def _scan(self) -> dict[str, Observation]:
        """Every wanted regular file below the folder (runs in a thread)."""
        found: dict[str, Observation] = {}
        for root, dirs, files in os.walk(self.folder):
            if self.config.recursive:
                dirs[:] = [d for d in dirs if not any(fnmatch.fnmatchcase(d, p)
                                                      for p in self.config.ignore_patterns)]
            else:
                dirs[:] = []
            for name in files:
                path = Path(root) / name
                rel = self.relative(str(path))
                obs = observe(path) if rel else None
                if rel and obs:
                    found[rel] = obs
        return found

    def _apply_scan(self, snapshot: dict[str, Observation]) -> None:
        self._counts["scans"] += 1
        for rel, obs in snapshot.items():
            known = self._known.get(rel)
            if known is None or known[0] != obs:
                self.touch(rel)
        for rel in list(self._known):
            if rel not in snapshot:
                self.gone(rel)

    def _resume_unfinished(self) -> None:
        """Queue again what was pending when we last stopped, unless the file changed since."""
        for kind, version in self.index.unfinished():
            if kind is Kind.CREATED:
                obs = observe(self.folder / version.key)
                if obs is None or (obs.size, obs.mtime_ns) != (version.size, version.mtime_ns):
                    self.index.record(kind, version, "superseded")
                    continue
            self._enqueue(kind, version)

    def _removed_while_away(self, snapshot: dict[str, Observation]) -> None:
        """Objects the index last saw created whose file vanished while we were not running:
        a removed event when configured, else a skipped removal (so prune forgets them)."""
        report = Kind.REMOVED.value in self.config.events
        for rel, (kind, version) in self.index.latest().items():
            if kind is Kind.CREATED and rel not in snapshot and self.wanted(rel):
                if report:
                    self._enqueue(Kind.REMOVED, version)
                else:
                    self.index.record(Kind.REMOVED, version, "skipped")

    # ---------------------------------------------------------------- file system events

    def on_fs_event(self, event_type: str, src: str, dest: str, is_directory: bool) -> None:
        """Called in the loop for each watchdog event."""
        if self._stopping.is_set():
            return
        if is_directory:
            if event_type in ("created", "moved", "deleted"):
                self._rescan_wake.set()  # files inside a moved-in folder give no events
            return
        if event_type in ("created", "modified", "closed"):
            self._touch_path(src)
        elif event_type == "moved":
            self._gone_path(src)
            self._touch_path(dest)
        elif event_type == "deleted":
            self._gone_path(src)

    def _touch_path(self, path: str) -> None:
        rel = self.relative(path)
        if rel is not None:
            self.touch(rel)

    def _gone_path(self, path: str) -> None:
        rel = self.relative(path)
        if rel is not None:
            self.gone(rel)

    def touch(self, rel: str) -> None:
        """The file may have changed: (re)start its settle clock if it did."""
        if rel in self._hashing:
            return
        obs = observe(self.folder / rel)
        if obs is None:
            self.gone(rel)
            return
        known = self._known.get(rel)
        if known is not None and known[0] == obs:
            self._settling.pop(rel, None)
            return
        current = self._settling.get(rel)
        if current is None or current[0] != obs:
            self._settling[rel] = (obs, time.monotonic())
            self._settle_wake.set()

    def gone(self, rel: str) -> None:
        """The file may have been removed (or renamed away)."""
        if observe(self.folder / rel) is not None:
            self.touch(rel)  # removed and created again, or replaced by a rename
            return
        self._settling.pop(rel, None)
        known = self._known.pop(rel, None)
        if known is not None and Kind.REMOVED.value in self.config.events:
            self._enqueue(Kind.REMOVED, known[1])
        elif known is not None:
            self.index.record(Kind.REMOVED, known[1], "skipped")  # lets prune forget it

    # ---------------------------------------------------------------- settling

    async def _settle_loop(self) -> None:
        while True:
            if not self._settling:
                self._settle_wake.clear()
                await self._settle_wake.wait()
            await asyncio.sleep(self.tick_s)
            try:
                self._settle_tick(time.monotonic())
            except Exception as exc:  # e.g. the index is locked or the disk is full
                self._internal_error("settling files", exc)
                await asyncio.sleep(1)

    def _settle_tick(self, now: float) -> None:
        for rel, (obs, since) in list(self._settling.items()):
            current = observe(self.folder / rel)
            if current is None:
                self.gone(rel)
            elif current != obs:
                self._settling[rel] = (current, now)
            elif now - since >= self.settle_s:
                del self._settling[rel]
                self._hashing.add(rel)
                self._spawn(self._settled(rel, obs))

    def _internal_error(self, doing: str, exc: BaseException) -> None:
        self._last_error = f"{doing}: {type(exc).__name__}: {exc}"
        log.error("file trigger %s: error while %s", self.name, doing, exc_info=exc)

    async def _settled(self, rel: str, obs: Observation) -> None:
        """``rel`` stayed unchanged for settle_ms: find its version and invoke if new."""
        try:
            version = finished = self.index.finished(rel, obs)
            if version is None:
                try:
                    etag = await asyncio.to_thread(md5_hex, self.folder / rel)
                except OSError as exc:
                    self._unreadable(rel, exc)  # the next rescan tries again
                    return
                if observe(self.folder / rel) != obs:
                    self._hashing.discard(rel)
                    self.touch(rel)  # it changed while we read it: settle again
                    return
                version = FileVersion(rel, obs.size, obs.mtime_ns, etag)
        finally:
            self._hashing.discard(rel)
        self._known[rel] = (obs, version)
        self._unreadable_keys.discard(rel)
        if finished is not None:  # this very version was handled before (a restart)
            return
        self._counts["seen"] += 1
        if Kind.CREATED.value not in self.config.events:
            self.index.record(Kind.CREATED, version, "skipped")
            return
        self._enqueue(Kind.CREATED, version)

    def _unreadable(self, rel: str, exc: OSError) -> None:
        self._last_error = f"{rel}: cannot read: {exc}"
        if rel not in self._unreadable_keys:
            self._unreadable_keys.add(rel)
            log.warning("file trigger %s: cannot read %s (%s); trying again on each rescan",
                        self.name, rel, exc)

    # ---------------------------------------------------------------- rescans

    async def _rescan_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._rescan_wake.wait(), self.config.rescan_s)
            self._rescan_wake.clear()
            try:
                snapshot = await asyncio.to_thread(self._scan)
                self._apply_scan(snapshot)
                if time.monotonic() - self._pruned_at > PRUNE_EVERY_S:
                    await self._prune()
            except Exception as exc:
                self._internal_error("rescanning the folder", exc)

    async def _prune(self) -> None:
        self._pruned_at = time.monotonic()
        self._counts["pruned"] += await asyncio.to_thread(self.index.prune)

    # ---------------------------------------------------------------- invocation

    def _enqueue(self, kind: Kind, version: FileVersion) -> None:
        if (kind, version) in self._queued:
            return
        request_id = str(uuid.uuid4())
        self.index.record(kind, version, "pending", request_id=request_id)
        self._queued.add((kind, version))
        self._jobs.put_nowait(Job(kind, version, request_id))

    async def _job_loop(self) -> None:
        """Start one delivery per job: in sync mode no faster than the function has room for,
        and never more than MAX_IN_FLIGHT at once (queueing for event mode is quick)."""
        while True:
            job = await self._jobs.get()
            await self._in_flight.acquire()
            if self.mode == "sync":
                await self.host.wait_for_capacity(self.config.function)
            self._spawn(self._deliver(job), self._deliveries)
            await asyncio.sleep(0)  # let the delivery take its slot before looking again

    def _sequencer(self) -> str:
        self._last_sequencer = max(time.time_ns(), self._last_sequencer + 1)
        return f"{self._last_sequencer:016X}"

    def _event(self, job: Job) -> dict[str, Any]:
        return s3_event(kind=job.kind, version=job.version, bucket=self.bucket,
                        region=self.config.region, sequencer=self._sequencer(),
                        request_id=job.request_id.replace("-", ""), configuration_id=self.name,
                        path=self.folder / job.version.key)

    async def _deliver(self, job: Job) -> None:
        """Invoke until success or retries run out; throttling waits without using a retry."""
        event = self._event(job)
        attempt = 0
        try:
            while not self._stopping.is_set():
                attempt += 1
                try:
                    result = await self._invoke(event, job.request_id)
                    error = None if result.ok else f"{result.error_type}: {result.error_message}"
                except TooManyRequestsException:
                    attempt -= 1
                    if await self._pause(THROTTLE_BACKOFF_S):
                        return
                    continue
                except FlowrunError as exc:
                    error = f"{exc.error_type}: {exc}"
                if error is None:
                    self.index.record(job.kind, job.version, "done", attempts=attempt)
                    self._counts["invoked"] += 1
                    return
                self._last_error = f"{job.version.key}: {error}"
                if attempt > self.config.retries:
                    self._fail(job, attempt, error)
                    return
                self._counts["retries"] += 1
                delay_s = self.config.retry_backoff_s * 2 ** (attempt - 1)
                log.warning("file trigger %s: %s failed (%s); retry %d of %d in %.1f s",
                            self.name, job.version.key, error, attempt, self.config.retries,
                            delay_s)
                if await self._pause(delay_s):
                    return
        finally:
            self._queued.discard((job.kind, job.version))
            self._in_flight.release()

    async def _pause(self, delay_s: float) -> bool:
        """Sleep ``delay_s``; True if the trigger is stopping (the version stays pending)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), delay_s)
        return self._stopping.is_set()

    def _fail(self, job: Job, attempts: int, error: str) -> None:
        self.index.record(job.kind, job.version, "failed", attempts=attempts, error=error)
        self._counts["failed"] += 1
        log.error("file trigger %s: %s %s failed after %d attempts, giving up: %s", self.name,
                  job.kind.value, job.version.key, attempts, error)

    async def _invoke(self, event: dict[str, Any], request_id: str) -> InvocationResult:
        if self.mode == "event":
            try:
                return await self.host.invoke(self.config.function, event, mode="event",
                                              source=self.name, request_id=request_id)
            except TooManyRequestsException:
                raise
            except FlowrunError as exc:
                log.warning("file trigger %s: asynchronous invocation unavailable (%s); "
                            "invoking synchronously", self.name, exc)
                self.mode = "sync"
        return await self.host.invoke(self.config.function, event, mode="sync",
                                      source=self.name, request_id=request_id)

    # ---------------------------------------------------------------- status

    def statistics(self) -> FileTriggerStatistics:
        pending = len(self._settling) + len(self._hashing) + len(self._queued)
        return FileTriggerStatistics(
            state=self.state, path=str(self.folder), seen=self._counts["seen"],
            invoked=self._counts["invoked"], pending=pending, failed=self._counts["failed"],
            retries=self._counts["retries"], scans=self._counts["scans"],
            watching=self.watching, invocation=self.mode, last_error=self._last_error,
            pruned=self._counts["pruned"])

    def status(self) -> dict[str, Any]:
        return dataclasses.asdict(self.statistics())
