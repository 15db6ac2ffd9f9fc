"""The cron trigger: fire-time computation across DST changes, clocks, and real invocations
driven by a fake clock through a real runtime."""

from __future__ import annotations

import asyncio
import json
import logging
import textwrap
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from flowrun import config as config_module
from flowrun.config import ConfigError
from flowrun.types import FlowrunError, InvocationMode, InvocationResult
from triggers import cron
from triggers.cron import CronConfig, CronTrigger, FakeClock, SystemClock, parse_schedule, zone

BERLIN = zone("Europe/Berlin")
NEW_YORK = zone("America/New_York")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def fires_between(expression: str, tz: Any, start: datetime, end: datetime) -> list[datetime]:
    schedule = parse_schedule(expression, tz)
    out: list[datetime] = []
    cursor: datetime | None = start
    while (cursor := schedule.next_after(cursor)) is not None and cursor < end:  # type: ignore[arg-type]
        out.append(cursor)
    return out


def local_dates(fires: list[datetime], tz: Any) -> list[str]:
    return [f.astimezone(tz).date().isoformat() for f in fires]


# --------------------------------------------------------------------------- fixed times


def test_a_fixed_time_in_the_berlin_spring_gap_fires_once_at_three_local() -> None:
    fires = fires_between("30 2 * * *", BERLIN, utc(2026, 3, 27, 12), utc(2026, 3, 31, 12))
    assert fires == [utc(2026, 3, 28, 1, 30), utc(2026, 3, 29, 1, 0),
                     utc(2026, 3, 30, 0, 30), utc(2026, 3, 31, 0, 30)]
    assert fires[1].astimezone(BERLIN).strftime("%H:%M %Z") == "03:00 CEST"


def test_a_fixed_time_in_the_berlin_fall_overlap_fires_once_at_its_first_occurrence() -> None:
    fires = fires_between("30 2 * * *", BERLIN, utc(2026, 10, 23, 12), utc(2026, 10, 27, 12))
    assert fires == [utc(2026, 10, 24, 0, 30), utc(2026, 10, 25, 0, 30),
                     utc(2026, 10, 26, 1, 30), utc(2026, 10, 27, 1, 30)]
    assert fires[1].astimezone(BERLIN).strftime("%H:%M %Z") == "02:30 CEST"


def test_a_fixed_time_in_the_new_york_spring_gap_fires_once_at_three_local() -> None:
    fires = fires_between("30 2 * * *", NEW_YORK, utc(2026, 3, 7, 0), utc(2026, 3, 10, 0))
    assert fires == [utc(2026, 3, 7, 7, 30), utc(2026, 3, 8, 7, 0), utc(2026, 3, 9, 6, 30)]
    assert fires[1].astimezone(NEW_YORK).strftime("%H:%M %Z") == "03:00 EDT"


def test_a_fixed_time_in_the_new_york_fall_overlap_fires_once_at_its_first_occurrence() -> None:
    fires = fires_between("30 1 * * *", NEW_YORK, utc(2026, 10, 31, 12), utc(2026, 11, 3, 0))
    assert fires == [utc(2026, 11, 1, 5, 30), utc(2026, 11, 2, 6, 30)]
    assert fires[0].astimezone(NEW_YORK).strftime("%H:%M %Z") == "01:30 EDT"


def test_a_schedule_at_the_exact_start_of_the_gap_fires_at_the_end_of_the_gap() -> None:
    fires = fires_between("0 2 * * *", BERLIN, utc(2026, 3, 28, 12), utc(2026, 3, 30, 0))
    assert fires == [utc(2026, 3, 29, 1, 0)]


@pytest.mark.parametrize("tz_name", ["Europe/Berlin", "America/New_York"])
def test_a_fixed_daily_time_fires_exactly_once_on_every_local_day_of_2026(tz_name: str) -> None:
    tz = zone(tz_name)
    start = datetime(2026, 1, 1, tzinfo=tz).astimezone(UTC) - timedelta(seconds=1)
    end = datetime(2027, 1, 1, tzinfo=tz).astimezone(UTC)
    for expression in ("30 2 * * *", "30 1 * * *", "0 2 * * *"):
        dates = local_dates(fires_between(expression, tz, start, end), tz)
        assert len(dates) == 365 == len(set(dates)), expression


# --------------------------------------------------------------------------- intervals


@pytest.mark.parametrize(("tz_name", "day"), [
    ("Europe/Berlin", utc(2026, 3, 28, 12)), ("Europe/Berlin", utc(2026, 10, 24, 12)),
    ("America/New_York", utc(2026, 3, 7, 12)), ("America/New_York", utc(2026, 10, 31, 12)),
])
def test_an_hourly_schedule_fires_every_real_hour_across_a_dst_change(tz_name: str,
                                                                      day: datetime) -> None:
    fires = fires_between("0 * * * *", zone(tz_name), day, day + timedelta(hours=36))
    assert fires == [day + timedelta(hours=h) for h in range(1, 36)]


@pytest.mark.parametrize("day", [utc(2026, 3, 28, 12), utc(2026, 10, 24, 12)])
def test_a_quarter_hourly_schedule_keeps_real_time_across_a_dst_change(day: datetime) -> None:
    fires = fires_between("*/15 * * * *", BERLIN, day, day + timedelta(hours=24))
    assert fires == [day + timedelta(minutes=15 * k) for k in range(1, 96)]


def test_an_hourly_schedule_at_half_past_does_not_fire_extra_in_the_spring_gap() -> None:
    day = utc(2026, 3, 28, 12)
    fires = fires_between("30 * * * *", BERLIN, day, day + timedelta(hours=24))
    assert fires == [day + timedelta(minutes=30 + 60 * k) for k in range(24)]


def test_a_rate_of_five_minutes_fires_every_five_minutes_of_utc_time() -> None:
    fires = fires_between("rate(5 minutes)", BERLIN, utc(2026, 10, 25, 0, 2, 30),
                          utc(2026, 10, 25, 1, 30))
    assert fires == [utc(2026, 10, 25, 0, 5) + timedelta(minutes=5 * k) for k in range(17)]


def test_rates_of_one_hour_and_one_day_align_to_utc() -> None:
    assert parse_schedule("rate(1 hour)").next_after(utc(2026, 5, 1, 10, 59, 59)) == \
        utc(2026, 5, 1, 11)
    assert parse_schedule("rate(1 day)").next_after(utc(2026, 5, 1, 10)) == utc(2026, 5, 2)
    two_days = parse_schedule("rate(2 days)").upcoming(utc(2026, 5, 1, 10), 2)
    assert two_days[1] - two_days[0] == timedelta(days=2) and two_days[0].hour == 0


def test_eventbridge_cron_numbers_weekdays_from_sunday_and_filters_years() -> None:
    mondays = parse_schedule("cron(0 8 ? * 2 *)").upcoming(utc(2026, 1, 1), 2)
    assert mondays == [utc(2026, 1, 5, 8), utc(2026, 1, 12, 8)]
    assert parse_schedule("cron(0 10 * * ? 2027)").next_after(utc(2026, 6, 1)) == \
        utc(2027, 1, 1, 10)
    assert parse_schedule("cron(0 0 1 1 ? 2020)").next_after(utc(2026, 1, 1)) is None
    last_fridays = parse_schedule("cron(0 10 ? * 6L *)").upcoming(utc(2026, 1, 1), 2)
    assert last_fridays == [utc(2026, 1, 30, 10), utc(2026, 2, 27, 10)]


# --------------------------------------------------------------------------- clocks


class FakeTime:
    """A wall clock for SystemClock whose sleep advances it, with scripted jumps."""

    def __init__(self, start: float, jumps: dict[int, float] | None = None) -> None:
        self.now = start
        self.sleeps: list[float] = []
        self.jumps = jumps or {}

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds + self.jumps.get(len(self.sleeps), 0.0)


async def test_the_system_clock_sleeps_in_bounded_chunks_until_the_wall_time() -> None:
    fake = FakeTime(1_000.0)
    clock = SystemClock(fake.time, fake.sleep, max_sleep_s=10)
    await clock.sleep_until(datetime.fromtimestamp(1_035.0, UTC))
    assert fake.sleeps == [10, 10, 10, 5]
    assert clock.now() == datetime.fromtimestamp(1_035.0, UTC)


async def test_the_system_clock_wakes_after_a_suspend_within_one_chunk() -> None:
    fake = FakeTime(0.0, jumps={1: 3_600.0})  # suspended for an hour during the first chunk
    clock = SystemClock(fake.time, fake.sleep, max_sleep_s=10)
    await clock.sleep_until(datetime.fromtimestamp(600.0, UTC))
    assert fake.sleeps == [10]


async def test_the_system_clock_keeps_sleeping_when_the_wall_clock_steps_back() -> None:
    fake = FakeTime(0.0, jumps={1: -30.0})
    clock = SystemClock(fake.time, fake.sleep, max_sleep_s=10)
    await clock.sleep_until(datetime.fromtimestamp(20.0, UTC))
    assert sum(fake.sleeps) == 50
    assert fake.now >= 20


async def test_the_fake_clock_wakes_sleepers_only_when_moved() -> None:
    clock = FakeClock(utc(2026, 1, 1))
    sleeper = asyncio.create_task(clock.sleep_until(utc(2026, 1, 1, 0, 5)))
    assert await clock.wait_for_sleeper() == utc(2026, 1, 1, 0, 5)
    clock.advance(60)
    await asyncio.sleep(0)
    assert not sleeper.done()
    assert await clock.jump_to_next() == utc(2026, 1, 1, 0, 5)
    await sleeper
    assert clock.now() == utc(2026, 1, 1, 0, 5)


# --------------------------------------------------------------------------- config


BASE_CONFIG = """\
functions:
  tick:
    handler: cron_handlers.record
triggers:
  - type: cron
    function: tick
"""


def parse_error(trigger_keys: str) -> config_module.ConfigIssue:
    text = BASE_CONFIG + textwrap.indent(textwrap.dedent(trigger_keys), "    ")
    with pytest.raises(ConfigError) as info:
        config_module.parse(text, "flowrun.yaml")
    assert len(info.value.issues) == 1, str(info.value)
    return info.value.issues[0]


def test_a_bad_cron_expression_is_a_config_error_with_its_line() -> None:
    issue = parse_error('schedule: "61 * * * *"\n')
    assert (issue.line, issue.path) == (7, "triggers[0].schedule")
    assert "out of range" in issue.message and "rate(5 minutes)" not in issue.message
    assert "*/5 * * * *" in issue.message
    assert str(issue).startswith("flowrun.yaml:7: triggers[0].schedule: invalid cron expression")


def test_a_bad_rate_unit_is_a_config_error_naming_the_valid_units() -> None:
    issue = parse_error('timezone: Europe/Berlin\nschedule: rate(5 weeks)\n')
    assert (issue.line, issue.path) == (8, "triggers[0].schedule")
    assert "minute, minutes, hour, hours, day, days" in issue.message
    assert "rate(5 weeks)" in issue.message


def test_a_rate_of_one_with_a_plural_unit_is_a_config_error() -> None:
    issue = parse_error("schedule: rate(1 minutes)\n")
    assert "rate(1 minute)" in issue.message


def test_a_bad_timezone_is_a_config_error_naming_an_example() -> None:
    issue = parse_error('schedule: "*/5 * * * *"\ntimezone: Europe/Atlantis\n')
    assert (issue.line, issue.path) == (8, "triggers[0].timezone")
    assert "Europe/Berlin" in issue.message and "Europe/Atlantis" in issue.message


def test_a_good_cron_trigger_parses_with_its_defaults() -> None:
    config = config_module.parse(BASE_CONFIG + "    schedule: rate(1 minute)\n")
    trigger = config.triggers[0]
    assert isinstance(trigger, CronConfig)
    assert (trigger.timezone, trigger.invocation, trigger.input) == ("UTC", "event", None)


# --------------------------------------------------------------------------- the trigger


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.02)


def recorded(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def cron_yaml(record_file: Path, trigger_keys: str, handler: str = "record") -> str:
    return f"""
functions:
  tick:
    handler: cron_handlers.{handler}
    code: {{functions}}
    permissions: {{user: root}}  # the handler writes into the test's private folder
    environment:
      RECORD_FILE: {record_file}
      SLOW_S: "3"
triggers:
  - type: cron
    function: tick
{"" if "invocation:" in trigger_keys else "    invocation: sync  # these tests watch the run itself"}
{textwrap.indent(textwrap.dedent(trigger_keys), "    ")}
"""


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch) -> Callable[[datetime], FakeClock]:
    def install(start: datetime) -> FakeClock:
        clock = FakeClock(start)
        monkeypatch.setattr(cron, "clock_factory", lambda: clock)
        return clock

    return install


async def test_a_fake_clock_drives_real_invocations_across_the_spring_change(
        make_runtime: Any, fake_clock: Callable[[datetime], FakeClock], tmp_path: Path) -> None:
    clock = fake_clock(utc(2026, 3, 27, 12))
    events = tmp_path / "events.jsonl"
    runtime = await make_runtime(cron_yaml(events, """\
        name: nightly
        schedule: "30 2 * * *"
        timezone: Europe/Berlin
    """))
    trigger = runtime.triggers[0]
    for n in range(1, 4):
        await clock.jump_to_next()
        await wait_until(lambda n=n: len(recorded(events)) == n and not trigger.status()["in_flight"])
    times = [event["time"] for event in recorded(events)]
    assert times == ["2026-03-28T01:30:00Z", "2026-03-29T01:00:00Z", "2026-03-30T00:30:00Z"]
    status = trigger.status()
    assert (status["fires"], status["skipped"], status["errors"]) == (3, 0, 0)
    assert status["last_fire"] == "2026-03-30T00:30:00Z"
    assert status["next_fire"] == "2026-03-31T00:30:00Z"
    assert status["last_status"] == "success" and status["last_error"] is None
    assert runtime.status()["triggers"][0]["next_fire"] == "2026-03-31T00:30:00Z"


async def test_the_function_receives_an_eventbridge_scheduled_event(
        make_runtime: Any, fake_clock: Callable[[datetime], FakeClock], tmp_path: Path) -> None:
    clock = fake_clock(utc(2026, 10, 25, 0, 58))
    events = tmp_path / "events.jsonl"
    await make_runtime(cron_yaml(events, """\
        name: every-5-minutes
        schedule: rate(5 minutes)
        account: "123456789012"
    """))
    await clock.jump_to_next()
    await wait_until(lambda: len(recorded(events)) == 1)
    event = recorded(events)[0]
    assert set(event) == {"version", "id", "detail-type", "source", "account", "time", "region",
                          "resources", "detail"}
    assert uuid.UUID(event.pop("id")).version == 4
    assert event == {
        "version": "0", "detail-type": "Scheduled Event", "source": "aws.events",
        "account": "123456789012", "time": "2026-10-25T01:00:00Z", "region": "us-east-1",
        "resources": ["arn:aws:events:us-east-1:123456789012:rule/every-5-minutes"],
        "detail": {},
    }


async def test_a_constant_input_is_sent_instead_of_the_scheduled_event(
        make_runtime: Any, fake_clock: Callable[[datetime], FakeClock], tmp_path: Path) -> None:
    clock = fake_clock(utc(2026, 1, 1))
    events = tmp_path / "events.jsonl"
    await make_runtime(cron_yaml(events, """\
        schedule: "* * * * *"
        input: {job: cleanup, days: 7}
    """))
    await clock.jump_to_next()
    await wait_until(lambda: len(recorded(events)) == 1)
    assert recorded(events) == [{"job": "cleanup", "days": 7}]


async def test_fires_due_while_the_previous_run_is_still_going_are_skipped_and_counted(
        make_runtime: Any, fake_clock: Callable[[datetime], FakeClock], tmp_path: Path) -> None:
    clock = fake_clock(utc(2026, 1, 1))
    events = tmp_path / "events.jsonl"
    runtime = await make_runtime(cron_yaml(events, 'schedule: "* * * * *"\n',
                                           handler="record_slowly"))
    trigger = runtime.triggers[0]
    for _ in range(3):
        await clock.jump_to_next()
    await wait_until(lambda: len(recorded(events)) == 1)
    assert trigger.status()["in_flight"]
    await wait_until(lambda: not trigger.status()["in_flight"])
    await clock.jump_to_next()
    await wait_until(lambda: len(recorded(events)) == 2)
    status = trigger.status()
    assert (status["fires"], status["skipped"]) == (2, 2)
    assert [e["time"] for e in recorded(events)] == ["2026-01-01T00:01:00Z", "2026-01-01T00:04:00Z"]


async def test_missed_fire_times_after_a_clock_jump_fire_once_for_the_latest(
        make_runtime: Any, fake_clock: Callable[[datetime], FakeClock], tmp_path: Path) -> None:
    clock = fake_clock(utc(2026, 1, 1))
    events = tmp_path / "events.jsonl"
    runtime = await make_runtime(cron_yaml(events, 'schedule: "*/10 * * * *"\n'))
    await clock.wait_for_sleeper()
    clock.set(utc(2026, 1, 1, 1, 5))  # e.g. the machine was suspended for an hour
    await wait_until(lambda: len(recorded(events)) == 1)
    assert recorded(events)[0]["time"] == "2026-01-01T01:00:00Z"
    status = runtime.triggers[0].status()
    assert (status["fires"], status["missed"]) == (1, 5)
    assert status["next_fire"] == "2026-01-01T01:10:00Z"


async def test_a_failing_function_is_counted_and_named_in_status(
        make_runtime: Any, fake_clock: Callable[[datetime], FakeClock], tmp_path: Path) -> None:
    clock = fake_clock(utc(2026, 1, 1))
    runtime = await make_runtime("""
functions:
  broken:
    handler: handlers.fail
    code: {functions}
triggers:
  - type: cron
    function: broken
    schedule: rate(1 minute)
    invocation: sync
""")
    trigger = runtime.triggers[0]
    await clock.jump_to_next()
    await wait_until(lambda: trigger.status()["errors"] == 1)
    status = trigger.status()
    assert status["last_status"] == "error"
    assert status["last_error"] == "ValueError: something went wrong"


async def test_event_invocation_goes_through_the_durable_queue(
        make_runtime: Any, fake_clock: Callable[[datetime], FakeClock], tmp_path: Path) -> None:
    clock = fake_clock(utc(2026, 1, 1))
    events = tmp_path / "events.jsonl"
    runtime = await make_runtime(cron_yaml(events, """\
        schedule: "*/5 * * * *"
        invocation: event
    """))
    await clock.jump_to_next()
    await wait_until(lambda: len(recorded(events)) == 1)
    assert recorded(events)[0]["time"] == "2026-01-01T00:05:00Z"
    status = runtime.triggers[0].status()
    assert (status["last_status"], status["fallbacks"], status["errors"]) == ("queued", 0, 0)


class QueuelessHost:
    """The real runtime as host, as it is before the durable queue exists."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime
        self.modes: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runtime, name)

    async def invoke(self, function: str, event: Any, *, mode: InvocationMode = "sync",
                     source: str = "", request_id: str | None = None) -> InvocationResult:
        self.modes.append(mode)
        if mode == "event":
            raise FlowrunError("asynchronous invocation needs the durable queue")
        result: InvocationResult = await self.runtime.invoke(function, event, source=source)
        return result


async def test_event_invocation_falls_back_to_sync_with_a_warning_without_the_queue(
        make_runtime: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    events = tmp_path / "events.jsonl"
    runtime = await make_runtime(cron_yaml(events, 'schedule: "* * * * *"\n'),
                                 start_triggers=False)
    host = QueuelessHost(runtime)
    config = CronConfig(type="cron", function="tick", schedule="* * * * *", invocation="event")
    clock = FakeClock(utc(2026, 1, 1))
    trigger = CronTrigger(config, host, clock=clock)
    await trigger.start()
    try:
        with caplog.at_level(logging.WARNING, logger="flowrun.triggers.cron"):
            await clock.jump_to_next()
            await wait_until(lambda: len(recorded(events)) == 1)
    finally:
        await trigger.stop()
    assert host.modes == ["event", "sync"]
    assert trigger.status()["fallbacks"] == 1
    assert "invoking synchronously instead" in caplog.text
