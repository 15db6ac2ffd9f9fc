"""The file trigger against real folders, real files and real worker processes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import vega_datasets
from watchdog.observers.api import BaseObserver

from flowrun.runtime import Runtime
from triggers.file import FileTrigger, FileVersion, Kind, Observation, ProcessedIndex, s3_key

TIMEOUT_S = 30.0
MakeRuntime = Callable[..., Any]


def config_yaml(log: Path, handler: str = "record", triggers: list[dict[str, Any]] | None = None,
                head: str = "", environment: dict[str, str] | None = None, **trigger: Any) -> str:
    """A config with one function writing to ``log`` and file triggers (JSON is YAML)."""
    if triggers is None:
        triggers = [{"path": "inbox", "settle_ms": 200, "rescan_s": 0.5, **trigger}]
    items = [{"type": "file", "function": "handle", **t} for t in triggers]
    env = {"FILE_LOG": str(log), **(environment or {})}
    return f"""{head}
functions:
  handle:
    handler: file_handlers.{handler}
    code: {{functions}}
    concurrency: 2
    permissions: {{user: root}}  # the handler writes into the test's private folder
    environment: {json.dumps(env)}
triggers: {json.dumps(items)}
"""


def lines(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


async def wait_for_lines(log: Path, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + TIMEOUT_S
    while len(lines(log)) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"expected {count} invocations, got {lines(log)}")
        await asyncio.sleep(0.05)
    return lines(log)


def file_trigger(runtime: Runtime, index: int = 0) -> FileTrigger:
    trigger = runtime.triggers[index]
    assert isinstance(trigger, FileTrigger)
    return trigger


async def wait_until_idle(runtime: Runtime) -> None:
    """Nothing settling or queued, and two full rescans done since: no more events coming."""
    for index in range(len(runtime.triggers)):
        trigger = file_trigger(runtime, index)
        scans = trigger.statistics().scans
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            stats = trigger.statistics()
            if stats.pending == 0 and stats.scans >= scans + 2:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"trigger never went idle: {stats}")
            await asyncio.sleep(0.05)


def keys(log: Path) -> list[str]:
    return sorted(line["key"] for line in lines(log))


def test_keys_are_url_encoded_like_s3_does() -> None:
    assert s3_key("a b/ü+c.csv") == "a+b/%C3%BC%2Bc.csv"
    assert s3_key("plain/name.csv") == "plain/name.csv"


async def test_a_new_file_gives_one_s3_event_with_an_url_encoded_key(
        make_runtime: MakeRuntime, tmp_path: Path) -> None:
    log = tmp_path / "calls.jsonl"
    runtime = await make_runtime(config_yaml(log))
    content = b"city,temp\nBerlin,3\n"
    target = tmp_path / "inbox" / "my report ü.csv"
    target.write_bytes(content)

    [call] = await wait_for_lines(log, 1)
    record = call["event"]["Records"][0]
    assert record["eventVersion"] == "2.1"
    assert record["eventSource"] == "aws:s3"
    assert record["awsRegion"] == "us-east-1"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["eventTime"])
    assert record["eventName"] == "ObjectCreated:Put"
    assert record["userIdentity"]["principalId"]
    assert record["requestParameters"]["sourceIPAddress"] == "127.0.0.1"
    assert set(record["responseElements"]) == {"x-amz-request-id", "x-amz-id-2"}
    s3 = record["s3"]
    assert s3["s3SchemaVersion"] == "1.0"
    assert s3["configurationId"] == "file:handle"
    assert s3["bucket"]["name"] == "inbox"
    assert s3["bucket"]["arn"] == "arn:aws:s3:::inbox"
    assert s3["bucket"]["ownerIdentity"]["principalId"]
    assert s3["object"]["key"] == "my+report+%C3%BC.csv"
    assert s3["object"]["size"] == len(content)
    assert s3["object"]["eTag"] == hashlib.md5(content).hexdigest()
    assert re.fullmatch(r"[0-9A-F]{16,}", s3["object"]["sequencer"])
    assert record["flowrun"]["path"] == str(target)

    await wait_until_idle(runtime)
    assert len(lines(log)) == 1
    status = runtime.status()["triggers"][0]
    assert status["state"] == "running" and status["watching"] is True
    assert (status["seen"], status["invoked"], status["pending"], status["failed"]) == (1, 1, 0, 0)


async def test_a_file_written_slowly_is_invoked_once_after_the_last_chunk(
        make_runtime: MakeRuntime, tmp_path: Path) -> None:
    log = tmp_path / "calls.jsonl"
    runtime = await make_runtime(config_yaml(log, settle_ms=600))
    chunk = b"x" * 1000 + b"\n"
    with open(tmp_path / "inbox" / "slow.csv", "wb") as f:
        for _ in range(5):
            f.write(chunk)
            f.flush()
            await asyncio.sleep(0.2)
        last_chunk_at = time.time()

    [call] = await wait_for_lines(log, 1)
    assert call["size"] == 5 * len(chunk)
    assert call["invoked_at"] >= last_chunk_at
    await wait_until_idle(runtime)
    assert len(lines(log)) == 1


async def test_an_editor_style_save_through_a_temp_file_gives_one_event_for_the_target(
        make_runtime: MakeRuntime, tmp_path: Path) -> None:
    log = tmp_path / "calls.jsonl"
    runtime = await make_runtime(config_yaml(log))
    inbox = tmp_path / "inbox"
    (inbox / ".name.csv.swp").write_bytes(b"vim swap")
    (inbox / "name.csv~").write_bytes(b"backup")
    temp = inbox / "name.tmp"
    with open(temp, "wb") as f:
        f.write(b"a,b\n")
        await asyncio.sleep(0.3)  # longer than settle_ms: still never a candidate
        f.write(b"1,2\n")
    os.rename(temp, inbox / "name.csv")

    [call] = await wait_for_lines(log, 1)
    assert call["key"] == "name.csv"
    assert call["size"] == 8
    await wait_until_idle(runtime)
    assert keys(log) == ["name.csv"]


async def test_patterns_ignore_patterns_and_recursion_choose_the_files(
        make_runtime: MakeRuntime, tmp_path: Path) -> None:
    for folder in ("deep", "flat"):
        for rel in ("a.csv", "b.txt", "skip_me.csv", "sub/c.csv", ".hidden/d.csv"):
            path = tmp_path / folder / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{folder}/{rel}\n")
    log = tmp_path / "calls.jsonl"
    common = {"settle_ms": 100, "rescan_s": 0.5, "patterns": ["*.csv"],
              "ignore_patterns": [".*", "skip*"]}
    runtime = await make_runtime(config_yaml(log, triggers=[
        {"path": "deep", "recursive": True, "name": "deep", **common},
        {"path": "flat", "name": "flat", **common},
    ]))
    (tmp_path / "deep" / "sub" / "new.csv").write_text("new\n")

    await wait_for_lines(log, 4)
    await wait_until_idle(runtime)
    buckets_keys = sorted(
        (line["event"]["Records"][0]["s3"]["bucket"]["name"], line["key"]) for line in lines(log))
    assert buckets_keys == [("deep", "a.csv"), ("deep", "sub/c.csv"), ("deep", "sub/new.csv"),
                            ("flat", "a.csv")]


async def test_files_and_folders_moved_in_from_outside_are_invoked(
        make_runtime: MakeRuntime, tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    (staging / "batch" / "deeper").mkdir(parents=True)
    (staging / "single.csv").write_text("1\n")
    (staging / "batch" / "one.csv").write_text("2\n")
    (staging / "batch" / "deeper" / "two.csv").write_text("3\n")
    log = tmp_path / "calls.jsonl"
    runtime = await make_runtime(config_yaml(log, recursive=True))
    os.rename(staging / "single.csv", tmp_path / "inbox" / "single.csv")
    os.rename(staging / "batch", tmp_path / "inbox" / "batch")

    await wait_for_lines(log, 3)
    await wait_until_idle(runtime)
    assert keys(log) == ["batch/deeper/two.csv", "batch/one.csv", "single.csv"]


async def test_removing_a_file_gives_a_removed_event_when_configured(
        make_runtime: MakeRuntime, tmp_path: Path) -> None:
    log = tmp_path / "calls.jsonl"
    await make_runtime(config_yaml(log, events=["created", "removed"]))
    target = tmp_path / "inbox" / "gone soon.csv"
    target.write_text("x\n")
    await wait_for_lines(log, 1)
    target.unlink()

    created, removed = await wait_for_lines(log, 2)
    assert created["eventName"] == "ObjectCreated:Put"
    assert removed["eventName"] == "ObjectRemoved:Delete"
    assert removed["key"] == "gone+soon.csv"
    assert removed["size"] is None  # S3 sends no size or eTag for a delete
    assert removed["event"]["Records"][0]["s3"]["object"]["sequencer"] > \
        created["event"]["Records"][0]["s3"]["object"]["sequencer"]


async def test_a_restart_neither_repeats_nor_loses_files(
        make_runtime: MakeRuntime, tmp_path: Path) -> None:
    log = tmp_path / "calls.jsonl"
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "before start.csv").write_text("1\n")
    first = await make_runtime(config_yaml(log, events=["created", "removed"]))
    (inbox / "while running.csv").write_text("2\n")
    await wait_for_lines(log, 2)
    await wait_until_idle(first)
    await first.stop()
    assert not [t for t in threading.enumerate() if isinstance(t, BaseObserver)]

    (inbox / "while stopped.csv").write_text("3\n")
    (inbox / "before start.csv").unlink()
    second = await make_runtime(config_yaml(log, events=["created", "removed"]))
    (inbox / "after restart.csv").write_text("4\n")
    await wait_for_lines(log, 5)
    await wait_until_idle(second)

    assert sorted((line["eventName"], line["key"]) for line in lines(log)) == [
        ("ObjectCreated:Put", "after+restart.csv"),
        ("ObjectCreated:Put", "before+start.csv"),
        ("ObjectCreated:Put", "while+running.csv"),
        ("ObjectCreated:Put", "while+stopped.csv"),
        ("ObjectRemoved:Delete", "before+start.csv"),
    ]
    assert (tmp_path / ".flowrun" / "files.db").exists()


def index_rows(tmp_path: Path) -> list[tuple[str, str, int]]:
    db = sqlite3.connect(tmp_path / ".flowrun" / "files.db")
    try:
        return db.execute("SELECT key, kind, size FROM versions ORDER BY id").fetchall()
    finally:
        db.close()


async def test_the_index_forgets_history_it_never_reads_again_without_repeating_a_file(
        make_runtime: MakeRuntime, tmp_path: Path) -> None:
    log = tmp_path / "calls.jsonl"
    inbox = tmp_path / "inbox"
    first = await make_runtime(config_yaml(log, events=["created", "removed"]))
    (inbox / "kept.csv").write_text("1\n")
    await wait_for_lines(log, 1)
    (inbox / "kept.csv").write_text("1,2\n")  # a second version of the same object
    (inbox / "gone.csv").write_text("3\n")
    await wait_for_lines(log, 3)
    await wait_until_idle(first)
    (inbox / "gone.csv").unlink()
    await wait_for_lines(log, 4)
    await wait_until_idle(first)
    await first.stop()
    assert len(index_rows(tmp_path)) == 4  # every version seen, and the removal

    second = await make_runtime(config_yaml(log, events=["created", "removed"]))
    await wait_until_idle(second)
    assert index_rows(tmp_path) == [("kept.csv", "created", 4)]
    assert file_trigger(second).status()["pruned"] == 3
    assert len(lines(log)) == 4  # nothing ran again
    (inbox / "gone.csv").write_text("a new object of an old name\n")
    fifth = (await wait_for_lines(log, 5))[-1]
    assert (fifth["eventName"], fifth["key"]) == ("ObjectCreated:Put", "gone.csv")
    await wait_until_idle(second)
    assert len(lines(log)) == 5


def an_index(tmp_path: Path) -> ProcessedIndex:
    index = ProcessedIndex(tmp_path / "files.db", "inbox")
    index.open()
    return index


def test_prune_keeps_a_key_with_a_pending_row_so_a_removal_is_not_reported_twice(
        tmp_path: Path) -> None:
    index = an_index(tmp_path)
    moved = FileVersion("moved.csv", 3, 1000, "e1")
    index.record(Kind.CREATED, moved, "pending")  # the handler moves its input away...
    index.record(Kind.REMOVED, moved, "done")  # ...and the removal finishes first
    assert index.prune() == 0
    index.record(Kind.CREATED, moved, "done")
    assert index.latest()["moved.csv"][0] is Kind.REMOVED  # gone: nothing to report again
    assert index.prune() == 2
    assert index.latest() == {}
    index.close()


def test_an_older_version_put_back_is_a_new_object_before_and_after_a_prune(
        tmp_path: Path) -> None:
    index = an_index(tmp_path)
    v1, v2 = FileVersion("f.csv", 3, 1000, "e1"), FileVersion("f.csv", 5, 2000, "e2")
    index.record(Kind.CREATED, v1, "done")
    index.record(Kind.CREATED, v2, "done")
    index.record(Kind.CREATED, FileVersion("f.csv", 4, 1500, "e3"), "superseded")
    for _ in range(2):
        assert index.finished("f.csv", Observation(3, 1000, 1)) is None  # v1 restored: new
        assert index.finished("f.csv", Observation(5, 2000, 1)) == v2
        assert index.prune() in (0, 2)  # v1's row and the superseded one, the first time
    assert index.prune() == 0
    index.close()


async def test_with_created_events_only_a_file_that_went_away_is_forgotten_by_the_index(
        make_runtime: MakeRuntime, tmp_path: Path) -> None:
    log = tmp_path / "calls.jsonl"
    inbox = tmp_path / "inbox"
    first = await make_runtime(config_yaml(log))
    (inbox / "consumed.csv").write_text("1\n")
    (inbox / "stays.csv").write_text("2\n")
    await wait_for_lines(log, 2)
    await wait_until_idle(first)
    (inbox / "consumed.csv").unlink()
    await first.stop()
    second = await make_runtime(config_yaml(log))
    await wait_until_idle(second)
    assert [key for key, _, _ in index_rows(tmp_path)] == ["stays.csv"]
    assert len(lines(log)) == 2


async def test_a_file_whose_invocation_was_cut_short_by_a_stop_is_invoked_after_restart(
        make_runtime: MakeRuntime, tmp_path: Path) -> None:
    log, starts = tmp_path / "calls.jsonl", tmp_path / "starts.txt"
    yaml_text = config_yaml(log, handler="slow_record", head="shutdown_grace_s: 0",
                            invocation="sync",
                            environment={"STARTS": str(starts), "SLOW_S": "2"})
    first = await make_runtime(yaml_text)
    (tmp_path / "inbox" / "cut.csv").write_text("x\n")
    deadline = time.monotonic() + TIMEOUT_S
    while not starts.exists():
        assert time.monotonic() < deadline, "the invocation never started"
        await asyncio.sleep(0.05)
    await first.stop(grace_s=0)
    assert lines(log) == []

    second = await make_runtime(yaml_text)
    [call] = await wait_for_lines(log, 1)
    assert call["key"] == "cut.csv"
    await wait_until_idle(second)
    assert starts.read_text().split() == ["cut.csv", "cut.csv"]
    assert len(lines(log)) == 1


async def test_rewriting_a_file_with_new_content_triggers_again(
        make_runtime: MakeRuntime, tmp_path: Path) -> None:
    log = tmp_path / "calls.jsonl"
    runtime = await make_runtime(config_yaml(log))
    target = tmp_path / "inbox" / "data.csv"
    target.write_text("first\n")
    await wait_for_lines(log, 1)
    target.write_text("second version\n")

    first, second = await wait_for_lines(log, 2)
    assert first["key"] == second["key"] == "data.csv"
    assert (first["size"], second["size"]) == (6, 15)
    assert first["eTag"] != second["eTag"]
    await wait_until_idle(runtime)
    assert len(lines(log)) == 2


async def test_a_failing_invocation_is_retried_then_failed_and_not_retried_after_restart(
        make_runtime: MakeRuntime, tmp_path: Path) -> None:
    log = tmp_path / "calls.jsonl"
    # sync: the trigger retries itself (with event the durable queue does, on its own clock)
    yaml_text = config_yaml(log, handler="fail", invocation="sync", retries=2,
                            retry_backoff_s=0.05)
    runtime = await make_runtime(yaml_text)
    (tmp_path / "inbox" / "bad.csv").write_text("x\n")

    await wait_for_lines(log, 3)
    trigger = file_trigger(runtime)
    await wait_until_idle(runtime)
    stats = trigger.statistics()
    assert (stats.invoked, stats.failed, stats.retries) == (0, 1, 2)
    assert stats.last_error is not None and "RuntimeError" in stats.last_error
    await runtime.stop()

    again = await make_runtime(yaml_text)
    await wait_until_idle(again)
    assert len(lines(log)) == 3


async def test_a_failed_first_attempt_succeeds_on_retry(
        make_runtime: MakeRuntime, tmp_path: Path) -> None:
    log = tmp_path / "calls.jsonl"
    runtime = await make_runtime(config_yaml(log, handler="fail_first_time", invocation="sync",
                                             retry_backoff_s=0.05))
    (tmp_path / "inbox" / "flaky.csv").write_text("x\n")

    await wait_for_lines(log, 1)
    await wait_until_idle(runtime)
    stats = file_trigger(runtime).statistics()
    assert (stats.invoked, stats.failed, stats.retries) == (1, 0, 1)


async def test_a_real_vega_datasets_csv_is_read_by_the_handler(
        make_runtime: MakeRuntime, tmp_path: Path) -> None:
    source = Path(vega_datasets.__file__).parent / "_data" / "seattle-weather.csv"
    log = tmp_path / "calls.jsonl"
    await make_runtime(config_yaml(log, handler="count_lines", patterns=["*.csv"]))
    shutil.copy(source, tmp_path / "inbox" / source.name)

    [call] = await wait_for_lines(log, 1)
    content = source.read_bytes()
    assert call["key"] == "seattle-weather.csv"
    assert call["size"] == len(content)
    assert call["eTag"] == hashlib.md5(content).hexdigest()
    assert call["lines"] == content.count(b"\n") > 1000


async def test_event_invocation_hands_the_file_to_the_durable_queue(
        make_runtime: MakeRuntime, tmp_path: Path) -> None:
    log = tmp_path / "calls.jsonl"
    runtime = await make_runtime(config_yaml(log, invocation="event"))
    assert runtime.async_queue is not None
    (tmp_path / "inbox" / "queued.csv").write_text("x\n")

    [call] = await wait_for_lines(log, 1)
    assert call["key"] == "queued.csv"
    await wait_until_idle(runtime)
    stats = file_trigger(runtime).statistics()
    assert (stats.invocation, stats.invoked, len(lines(log))) == ("event", 1, 1)


async def test_event_invocation_falls_back_to_sync_without_a_durable_queue(
        make_runtime: MakeRuntime, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log = tmp_path / "calls.jsonl"
    runtime = await make_runtime(config_yaml(log, invocation="event"))
    queue, runtime.async_queue = runtime.async_queue, None  # as when embedded without one
    try:
        (tmp_path / "inbox" / "a.csv").write_text("x\n")
        await wait_for_lines(log, 1)
        await wait_until_idle(runtime)
    finally:
        runtime.async_queue = queue
    assert len(lines(log)) == 1
    assert file_trigger(runtime).statistics().invocation == "sync"
    assert "invoking synchronously" in caplog.text


def test_an_unknown_event_kind_is_a_config_error(make_config: Callable[[str], Path]) -> None:
    from flowrun import config as config_module

    path = make_config(config_yaml(Path("log"), events=["modified"]))
    expected = r"triggers\[0\]\.events\[0\]: expected 'created' or 'removed'"
    with pytest.raises(config_module.ConfigError, match=expected):
        config_module.load(path)
