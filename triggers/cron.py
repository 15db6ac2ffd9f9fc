"""The cron trigger: runs a function on a schedule and sends it EventBridge's "Scheduled Event".

Schedules are five-field cron expressions (``*/5 * * * *``, ``@daily``), EventBridge rate
expressions (``rate(1 minute)``, ``rate(5 minutes)``) or EventBridge's six-field
``cron(min hour day-of-month month day-of-week year)`` form, evaluated in the trigger's IANA
``timezone``.

Fire times are computed here, not by croniter's own time-zone code (which fires a fixed-time
job twice when clocks fall back): croniter only enumerates *wall-clock* times on naive
datetimes, and this module maps each wall time onto real instants:

- a wall time that exists once is that instant;
- a wall time inside a spring-forward gap fires at the first valid instant after the gap
  (02:30 in Europe/Berlin on 2026-03-29 fires at 03:00 CEST) if the hour field is fixed, and is
  dropped if the hour field is a wildcard (``*``, ``*/2``), so interval schedules keep their
  rhythm in real time;
- a wall time inside a fall-back overlap fires once, at its first occurrence, if the hour field
  is fixed, and at both occurrences if the hour field is a wildcard (they are different hours in
  real time).

Time comes from a ``Clock``: ``SystemClock`` in production, ``FakeClock`` in tests.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any, Literal, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterError, croniter
from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError

from flowrun.types import FlowrunError, InvocationMode, InvocationResult, TooManyRequestsException
from triggers.base import Trigger, TriggerConfig, TriggerHost

log = logging.getLogger("flowrun.triggers.cron")

DEFAULT_ACCOUNT = "000000000000"
DEFAULT_REGION = "us-east-1"
# The largest difference between two UTC offsets of one zone around a transition that the
# fire-time search allows for (real zones shift by at most 2 hours).
MAX_SHIFT = timedelta(hours=3)
# After a long suspend, at most this many missed fire times are counted one by one.
MAX_COALESCE = 10_000

SCHEDULE_HELP = ("a five-field cron expression like '*/5 * * * *', rate(1 minute), "
                 "rate(N minutes|hours|days) or cron(0 12 * * ? *)")
TIMEZONE_HELP = "an IANA time zone name like Europe/Berlin, America/New_York or UTC"

_ALIASES = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_RATE = re.compile(r"^rate\(\s*(?P<value>[^\s)]+)\s+(?P<unit>[^\s)]+)\s*\)$", re.IGNORECASE)
_RATE_UNITS_S = {"minute": 60, "hour": 3600, "day": 86_400}
_EVENTBRIDGE = re.compile(r"^cron\((?P<fields>.*)\)$", re.IGNORECASE | re.DOTALL)
_VALIDATION_START = datetime(2026, 1, 1)


# --------------------------------------------------------------------------- schedules


class Schedule(abc.ABC):
    """When a trigger fires: ``next_after(t)`` is the first fire instant strictly after ``t``."""

    text: str

    @abc.abstractmethod
    def next_after(self, after: datetime) -> datetime | None:
        """The next fire time (aware, UTC) strictly after ``after``; None if it never fires."""

    def upcoming(self, after: datetime, count: int) -> list[datetime]:
        """The next ``count`` fire times after ``after`` (fewer if the schedule ends)."""
        out: list[datetime] = []
        cursor: datetime | None = after
        while len(out) < count and cursor is not None:
            cursor = self.next_after(cursor)
            if cursor is not None:
                out.append(cursor)
        return out


@dataclass(frozen=True)
class RateSchedule(Schedule):
    """``rate(N unit)``: every ``interval_s`` of real time, aligned to the Unix epoch (UTC), so
    ``rate(5 minutes)`` fires at :00, :05, :10 ... and a restart does not shift the phase."""

    text: str
    interval_s: int

    def next_after(self, after: datetime) -> datetime:
        ts = after.timestamp()
        n = int(ts // self.interval_s) + 1
        return datetime.fromtimestamp(n * self.interval_s, UTC)


@dataclass(frozen=True)
class CronSchedule(Schedule):
    """A cron expression evaluated on wall-clock time in ``tz`` (see the module docstring)."""

    text: str
    expression: str
    tz: tzinfo
    fixed_hour: bool
    years: frozenset[int] | None = None

    def next_after(self, after: datetime) -> datetime | None:
        # Away from a clock change wall times map onto instants in order, so the first match
        # after ``after`` is the answer. Near one, a later wall time can be an earlier instant
        # (the second 02:00 of a fall-back night comes before 02:30 of the first), so the search
        # starts and ends MAX_SHIFT of wall time further out.
        after = after.astimezone(UTC)
        start = _naive_local(after, self.tz)
        if self._near_change(after):
            start -= MAX_SHIFT
        best: datetime | None = None
        best_wall: datetime | None = None
        for wall in self._walls(start):
            if best is not None and best_wall is not None and (
                    wall > best_wall + MAX_SHIFT or not self._near_change(best)):
                break
            for instant in self._instants(wall):
                if instant > after and (best is None or instant < best):
                    best, best_wall = instant, wall
        return best

    def _near_change(self, instant: datetime) -> bool:
        """True if the zone's UTC offset changes within MAX_SHIFT of ``instant``."""
        return (instant - MAX_SHIFT).astimezone(self.tz).utcoffset() != \
            (instant + MAX_SHIFT).astimezone(self.tz).utcoffset()

    def _walls(self, start: datetime) -> Iterator[datetime]:
        """Naive wall-clock times matching the expression, ascending, after ``start``."""
        it = croniter(self.expression, start)
        while True:
            try:
                wall: datetime = it.get_next(datetime)
            except CroniterError:
                return
            if self.years is not None and wall.year not in self.years:
                later = [y for y in self.years if y > wall.year]
                if not later:
                    return
                it = croniter(self.expression, datetime(min(later), 1, 1) - timedelta(minutes=1))
                continue
            yield wall

    def _instants(self, wall: datetime) -> list[datetime]:
        """The real instants (UTC) at which wall-clock time ``wall`` fires."""
        first = wall.replace(tzinfo=self.tz, fold=0)
        second = wall.replace(tzinfo=self.tz, fold=1)
        if _naive_local(first.astimezone(UTC), self.tz) != wall:  # in a spring-forward gap
            return [] if not self.fixed_hour else [_transition(first, second)]
        if first.utcoffset() != second.utcoffset():  # in a fall-back overlap
            if self.fixed_hour:
                return [first.astimezone(UTC)]
            return [first.astimezone(UTC), second.astimezone(UTC)]
        return [first.astimezone(UTC)]


def _naive_local(instant: datetime, tz: tzinfo) -> datetime:
    return instant.astimezone(tz).replace(tzinfo=None, fold=0)


def _transition(a: datetime, b: datetime) -> datetime:
    """The instant (UTC) a gap ends: the clock change between two readings of a gap time."""
    lo, hi = sorted((int(a.timestamp()), int(b.timestamp())))
    tz = a.tzinfo
    after_offset = datetime.fromtimestamp(hi, tz).utcoffset()
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if datetime.fromtimestamp(mid, tz).utcoffset() == after_offset:
            hi = mid
        else:
            lo = mid
    return datetime.fromtimestamp(hi, UTC)


def parse_schedule(text: str, tz: tzinfo = UTC) -> Schedule:
    """Parse a schedule; ValueError says what is wrong and what would be valid."""
    text = text.strip()
    if text.lower().startswith("rate"):
        return _parse_rate(text)
    match = _EVENTBRIDGE.match(text)
    if match:
        expression, years = _from_eventbridge(match.group("fields"))
        return _cron(text, expression, tz, years)
    expression = _ALIASES.get(text.lower(), text)
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(f"a cron expression has five fields (minute hour day-of-month month "
                         f"day-of-week), this one has {len(fields)}; expected {SCHEDULE_HELP}")
    return _cron(text, " ".join(fields), tz, None)


def _parse_rate(text: str) -> RateSchedule:
    match = _RATE.match(text)
    if not match:
        raise ValueError("expected rate(VALUE UNIT) like rate(1 minute), rate(5 minutes), "
                         "rate(2 hours) or rate(1 day)")
    value_text, unit = match.group("value"), match.group("unit").lower()
    if not value_text.isdigit() or int(value_text) < 1:
        raise ValueError(f"the rate value must be a whole number of at least 1, not {value_text!r}")
    value = int(value_text)
    singular = unit[:-1] if unit.endswith("s") else unit
    if singular not in _RATE_UNITS_S:
        raise ValueError(f"unknown rate unit {unit!r}; valid units: minute, minutes, hour, hours, "
                         "day, days")
    if value == 1 and unit != singular:
        raise ValueError(f"a rate of 1 takes the singular unit: rate(1 {singular})")
    if value > 1 and unit == singular:
        raise ValueError(f"a rate above 1 takes the plural unit: rate({value} {singular}s)")
    return RateSchedule(text, value * _RATE_UNITS_S[singular])


def _from_eventbridge(inner: str) -> tuple[str, frozenset[int] | None]:
    """EventBridge ``cron(min hour dom month dow year)`` → a croniter expression and years."""
    fields = inner.split()
    if len(fields) != 6:
        raise ValueError(f"cron(...) takes six fields (minutes hours day-of-month month "
                         f"day-of-week year), this one has {len(fields)}; like cron(0 12 * * ? *)")
    minute, hour, dom, month, dow, year = fields
    dom = "*" if dom == "?" else dom
    dow = "*" if dow == "?" else _eventbridge_weekdays(dow)
    return " ".join((minute, hour, dom, month, dow)), _years(year)


def _eventbridge_weekdays(field: str) -> str:
    """EventBridge numbers weekdays 1-7 from Sunday; cron numbers them 0-6."""

    def shift(match: re.Match[str]) -> str:
        day = int(match.group(0))
        if not 1 <= day <= 7:
            raise ValueError(f"an EventBridge day-of-week is 1-7 (1 is Sunday) or SUN-SAT, "
                             f"not {day}")
        return str(day - 1)

    parts = []
    for part in field.split(","):
        if part.endswith("L") and part[:-1]:  # 6L: the month's last Friday
            part = "L" + part[:-1]
        head, sep, nth = part.partition("#")
        parts.append(re.sub(r"\d+", shift, head) + sep + nth)
    return ",".join(parts)


def _years(field: str) -> frozenset[int] | None:
    if field == "*":
        return None
    years: set[int] = set()
    for part in field.split(","):
        match = re.fullmatch(r"(\*|\d{4})(?:-(\d{4}))?(?:/(\d+))?", part)
        if not match:
            raise ValueError(f"the year field takes 1970-2199, ranges, lists and steps, "
                             f"not {field!r}")
        first = 1970 if match.group(1) == "*" else int(match.group(1))
        last = int(match.group(2) or (2199 if match.group(1) == "*" or match.group(3) else first))
        step = int(match.group(3) or 1)
        if not 1970 <= first <= last <= 2199 or step < 1:
            raise ValueError(f"years must lie in 1970-2199, not {part!r}")
        years.update(range(first, last + 1, step))
    return frozenset(years)


def _cron(text: str, expression: str, tz: tzinfo, years: frozenset[int] | None) -> CronSchedule:
    try:
        croniter(expression, _VALIDATION_START).get_next(datetime)
    except CroniterError as exc:
        reason = re.sub(r"^\[.*?\] (is not acceptable, )?", "", str(exc))
        if "failed to find next date" in reason:
            reason = "it never fires (no such day)"
        raise ValueError(f"invalid cron expression {expression!r}: {reason}; "
                         f"expected {SCHEDULE_HELP}") from None
    hour_field = expression.split()[1]
    return CronSchedule(text, expression, tz, fixed_hour=not hour_field.startswith("*"),
                        years=years)


def zone(name: str) -> tzinfo:
    """The IANA zone ``name``; ValueError names a valid example."""
    if name.upper() == "UTC":
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"unknown time zone; expected {TIMEZONE_HELP}") from None


def scheduled_time(instant: datetime) -> str:
    """``2026-03-29T01:00:00Z``: the format of the event's ``time``."""
    return instant.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- clocks


class Clock(Protocol):
    """Where a cron trigger gets its time from."""

    def now(self) -> datetime:
        """The current time, aware."""
        ...

    async def sleep_until(self, when: datetime) -> None:
        """Return once ``now() >= when``."""
        ...


class SystemClock:
    """Wall-clock time (``time.time``), slept on in bounded chunks so that a suspend or a clock
    step is noticed within ``max_sleep_s``: the event loop's sleep follows a monotonic clock,
    which does not advance while the machine is suspended and does not follow clock changes."""

    def __init__(self, time_source: Callable[[], float] = time.time,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
                 max_sleep_s: float = 10.0) -> None:
        self.time_source = time_source
        self.sleep = sleep
        self.max_sleep_s = max_sleep_s

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.time_source(), UTC)

    async def sleep_until(self, when: datetime) -> None:
        target = when.timestamp()
        while (remaining := target - self.time_source()) > 0:
            await self.sleep(min(remaining, self.max_sleep_s))


class FakeClock:
    """Virtual time for tests, like trio's MockClock: nothing moves until the test moves it.

    Sleepers wake when ``advance``/``set`` moves time to or past their deadline;
    ``jump_to_next()`` waits until something sleeps and moves time to the earliest deadline.
    """

    def __init__(self, start: datetime) -> None:
        if start.tzinfo is None:
            raise ValueError("FakeClock needs an aware datetime")
        self._now = start.astimezone(UTC)
        self._sleepers: list[tuple[datetime, asyncio.Future[None]]] = []
        self._changed: asyncio.Event | None = None

    def now(self) -> datetime:
        return self._now

    async def sleep_until(self, when: datetime) -> None:
        if when <= self._now:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (when.astimezone(UTC), future)
        self._sleepers.append(entry)
        self._notify()
        try:
            await future
        finally:
            if entry in self._sleepers:
                self._sleepers.remove(entry)

    @property
    def next_deadline(self) -> datetime | None:
        pending = [when for when, future in self._sleepers if not future.done()]
        return min(pending) if pending else None

    def set(self, when: datetime) -> None:
        """Move time to ``when`` (backwards too) and wake everyone whose deadline passed."""
        self._now = when.astimezone(UTC)
        for deadline, future in list(self._sleepers):
            if deadline <= self._now and not future.done():
                future.set_result(None)

    def advance(self, seconds: float) -> None:
        self.set(self._now + timedelta(seconds=seconds))

    async def wait_for_sleeper(self, timeout_s: float = 30.0) -> datetime:
        """The earliest deadline, once at least one task sleeps on this clock."""
        async with asyncio.timeout(timeout_s):
            while (deadline := self.next_deadline) is None:
                self._changed = self._changed or asyncio.Event()
                await self._changed.wait()
                self._changed.clear()
        return deadline

    async def jump_to_next(self, timeout_s: float = 30.0) -> datetime:
        """Wait for a sleeper, move time to the earliest deadline, return that deadline."""
        deadline = await self.wait_for_sleeper(timeout_s)
        self.set(deadline)
        await asyncio.sleep(0)
        return deadline

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()


clock_factory: Callable[[], Clock] = SystemClock
"""What a CronTrigger built without ``clock=`` uses; tests may replace it."""


# --------------------------------------------------------------------------- config


class CronConfig(TriggerConfig):
    """``type: cron``: run ``function`` on ``schedule`` in ``timezone``."""

    schedule: str = Field(description="'*/5 * * * *', rate(5 minutes) or cron(0 12 * * ? *)")
    timezone: str = Field("UTC", description="IANA zone the cron expression is read in")
    input: Any = Field(None, description="a constant event to send instead of the Scheduled Event")
    invocation: Literal["sync", "event"] = Field(
        "event", description="event (default, as on Lambda) queues the invocation durably "
                             "(falls back to sync without the queue); sync waits for it")
    account: str = Field(DEFAULT_ACCOUNT, pattern=r"^[0-9]{12}$",
                         description="account id in the event and its rule ARN")
    region: str = Field(DEFAULT_REGION, pattern=r"^[a-z0-9\-]+$")

    @field_validator("schedule")
    @classmethod
    def _valid_schedule(cls, value: str) -> str:
        try:
            parse_schedule(value)
        except ValueError as exc:
            raise PydanticCustomError("cron_schedule", _literal(str(exc))) from None
        return value

    @field_validator("timezone")
    @classmethod
    def _valid_timezone(cls, value: str) -> str:
        try:
            zone(value)
        except ValueError as exc:
            raise PydanticCustomError("cron_timezone", _literal(str(exc))) from None
        return value


def _literal(message: str) -> str:
    """PydanticCustomError formats ``{name}``: keep braces in a message literal."""
    return message.replace("{", "(").replace("}", ")")


# --------------------------------------------------------------------------- trigger


class CronTrigger(Trigger):
    """Fires on schedule; a fire due while this trigger's previous invocation still runs is
    skipped (and counted), and fire times missed while the daemon was down are not replayed."""

    config_model = CronConfig

    def __init__(self, config: TriggerConfig, host: TriggerHost, *,
                 clock: Clock | None = None) -> None:
        super().__init__(config, host)
        if not isinstance(config, CronConfig):
            config = CronConfig.model_validate(config.model_dump())
        self.cron: CronConfig = config
        self.schedule = parse_schedule(config.schedule, zone(config.timezone))
        self.clock: Clock = clock if clock is not None else clock_factory()
        self.rule_name = re.sub(r"[^A-Za-z0-9._\-]", "-", self.name)
        self._task: asyncio.Task[None] | None = None
        self._in_flight: asyncio.Task[None] | None = None
        self._next_fire: datetime | None = None
        self._last_fire: datetime | None = None
        self._state = "stopped"
        self.fires = 0
        self.skipped = 0
        self.missed = 0
        self.errors = 0
        self.fallbacks = 0
        self.last_error: str | None = None
        self.last_status: str | None = None

    async def start(self) -> None:
        self._state = "running"
        self._task = asyncio.create_task(self._run(), name=f"flowrun {self.name}")

    async def stop(self, wait_s: float = 30.0) -> None:
        """Stop scheduling; let an invocation in flight finish for up to ``wait_s``."""
        self._state = "stopped"
        for task in (self._task, self._in_flight):
            if task is None:
                continue
            if task is self._in_flight and not task.done():
                await asyncio.wait({task}, timeout=wait_s)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._task = self._in_flight = None

    def status(self) -> dict[str, Any]:
        def iso(instant: datetime | None) -> str | None:
            return scheduled_time(instant) if instant is not None else None

        return {
            "state": self._state, "schedule": self.cron.schedule, "timezone": self.cron.timezone,
            "invocation": self.cron.invocation,
            "next_fire": iso(self._next_fire), "last_fire": iso(self._last_fire),
            "fires": self.fires, "skipped": self.skipped, "missed": self.missed,
            "errors": self.errors, "fallbacks": self.fallbacks, "last_error": self.last_error,
            "last_status": self.last_status,
            "in_flight": self._in_flight is not None and not self._in_flight.done(),
        }

    def event(self, scheduled: datetime) -> Any:
        """What the function receives for a fire at ``scheduled``."""
        if self.cron.input is not None:
            return self.cron.input
        account, region = self.cron.account, self.cron.region
        return {
            "version": "0",
            "id": str(uuid.uuid4()),
            "detail-type": "Scheduled Event",
            "source": "aws.events",
            "account": account,
            "time": scheduled_time(scheduled),
            "region": region,
            "resources": [f"arn:aws:events:{region}:{account}:rule/{self.rule_name}"],
            "detail": {},
        }

    async def _run(self) -> None:
        cursor = self.clock.now()
        while True:
            fire_at = self.schedule.next_after(cursor)
            self._next_fire = fire_at
            if fire_at is None:
                self._state = "finished"
                log.info("%s: schedule %r has no more fire times", self.name, self.cron.schedule)
                return
            await self.clock.sleep_until(fire_at)
            now = self.clock.now()
            due = self._latest_due(fire_at, now)
            cursor = max(due, now)
            self._fire(due)

    def _latest_due(self, fire_at: datetime, now: datetime) -> datetime:
        """After a late wake-up (suspend, clock step) fire once, for the latest due time."""
        due = fire_at
        for _ in range(MAX_COALESCE):
            later = self.schedule.next_after(due)
            if later is None or later > now:
                break
            due = later
            self.missed += 1
        if due != fire_at:
            log.warning("%s: woke up late; firing once for %s, %d earlier fire times missed",
                        self.name, scheduled_time(due), self.missed)
        return due

    def _fire(self, scheduled: datetime) -> None:
        if self._in_flight is not None and not self._in_flight.done():
            self.skipped += 1
            log.warning("%s: skipped the fire at %s; the previous invocation still runs",
                        self.name, scheduled_time(scheduled))
            return
        self.fires += 1
        self._last_fire = scheduled
        self._in_flight = asyncio.create_task(self._invoke(scheduled))

    async def _invoke(self, scheduled: datetime) -> None:
        try:
            result = await self._send(self.event(scheduled))
        except FlowrunError as exc:
            self.errors += 1
            self.last_status = "throttled" if isinstance(exc, TooManyRequestsException) else "error"
            self.last_error = f"{exc.error_type}: {exc}"
            log.warning("%s: invocation for %s failed: %s", self.name, scheduled_time(scheduled),
                        self.last_error)
            return
        except Exception as exc:  # never let one fire take the schedule down
            self.errors += 1
            self.last_status = "error"
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.exception("%s: invocation for %s failed", self.name, scheduled_time(scheduled))
            return
        self.last_status = "queued" if result.extra.get("accepted") else result.status
        if result.status != "success":
            self.errors += 1
            self.last_error = f"{result.error_type}: {result.error_message}"

    async def _send(self, event: Any) -> InvocationResult:
        mode: InvocationMode = self.cron.invocation
        if mode == "event":
            try:
                return await self._host_invoke(event, "event")
            except TooManyRequestsException:
                raise
            except FlowrunError as exc:
                if self.fallbacks == 0:
                    log.warning("%s: asynchronous invocation unavailable (%s); invoking "
                                "synchronously instead", self.name, exc)
                self.fallbacks += 1
        return await self._host_invoke(event, "sync")

    async def _host_invoke(self, event: Any, mode: InvocationMode) -> InvocationResult:
        return await self.host.invoke(self.cron.function, event, mode=mode, source=self.name)
