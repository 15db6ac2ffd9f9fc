"""The durable queue: committed before acknowledged, retried, aged out, drained, crash-safe."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import aiohttp
import pytest
from waiting import eventually

from flowrun import config as config_module
from flowrun.runtime import Runtime
from flowrun.types import RequestTooLargeException, ResourceNotFoundException, TooManyRequestsException

REPO = Path(__file__).resolve().parents[2]


def config_text(tmp_path: Path, **function: object) -> str:
    """One function ``fn`` (``queue_handlers.record`` unless overridden) writing to out.txt.

    The handlers write into the test's folder, so workers keep the test's user.
    """
    settings = {"handler": "queue_handlers.record", "code": "{functions}", "concurrency": 2,
                "retry_backoff_s": [0.05, 0.1], "permissions": {"user": "root"},
                "environment": {"OUT_FILE": str(tmp_path / "out.txt"),
                                "FLAG_FILE": str(tmp_path / "flag")}}
    settings.update(function)
    return "state_dir: state\nfunctions:\n  fn: " + json.dumps(settings) + "\n"



def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def queue_rows(state_dir: Path, sql: str = "SELECT count(*) FROM queue") -> list[tuple]:
    db = sqlite3.connect(state_dir / "queue.db")
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


async def test_an_asynchronous_invocation_is_on_disk_when_it_is_acknowledged(make_runtime, tmp_path):
    runtime = await make_runtime(config_text(tmp_path), run_queue=False)
    result = await runtime.invoke("fn", {"n": 1}, mode="event", request_id="req-1")
    assert result.ok and result.extra["accepted"] and result.extra["status_code"] == 202
    rows = queue_rows(runtime.state_dir, "SELECT request_id, function, event, status FROM queue")
    assert rows == [("req-1", "fn", '{"n": 1}', "new")]
    mode = queue_rows(runtime.state_dir, "PRAGMA journal_mode")
    assert mode == [("wal",)]


async def test_queued_invocations_run_with_their_request_ids(make_runtime, tmp_path):
    runtime = await make_runtime(config_text(tmp_path))
    ids = [(await runtime.invoke("fn", {"i": i}, mode="event")).request_id for i in range(20)]
    await eventually(lambda: len(lines(tmp_path / "out.txt")) == 20)
    assert sorted(lines(tmp_path / "out.txt")) == sorted(ids)
    await eventually(lambda: queue_rows(runtime.state_dir) == [(0,)])


async def test_a_function_failing_twice_succeeds_on_the_third_attempt_with_the_same_request_id(
        make_runtime, tmp_path):
    runtime = await make_runtime(config_text(tmp_path, handler="queue_handlers.fail_twice",
                                             on_success=f"folder:{tmp_path / 'done'}"))
    accepted = await runtime.invoke("fn", {"job": 7}, mode="event")
    await eventually(lambda: list((tmp_path / "done").glob("*.json")))
    assert lines(tmp_path / "out.txt") == [accepted.request_id] * 3
    record = json.loads(next((tmp_path / "done").glob("*.json")).read_text())
    assert record["requestContext"]["requestId"] == accepted.request_id
    assert record["requestContext"]["condition"] == "Success"
    assert record["requestContext"]["approximateInvokeCount"] == 3
    assert record["requestContext"]["functionArn"].endswith(":function:fn:$LATEST")
    assert record["requestPayload"] == {"job": 7}
    assert record["responsePayload"] == {"attempts": 3}
    assert record["responseContext"] == {"statusCode": 200, "executedVersion": "$LATEST"}
    assert record["version"] == "1.0" and record["timestamp"].endswith("Z")


async def test_retries_stop_after_retries_and_the_failure_is_a_dead_letter_with_every_error(
        make_runtime, tmp_path):
    runtime = await make_runtime(config_text(tmp_path, handler="handlers.fail", retries=1))
    accepted = await runtime.invoke("fn", {"x": 1}, mode="event")
    await eventually(lambda: queue_rows(
        runtime.state_dir, "SELECT count(*) FROM dead_letters") == [(1,)])
    row = queue_rows(runtime.state_dir, "SELECT request_id, condition, attempts, errors, event, "
                                        "enqueued_at, failed_at, record FROM dead_letters")[0]
    request_id, condition, attempts, errors, event, enqueued_at, failed_at, record = row
    assert (request_id, condition, attempts, event) == (accepted.request_id, "RetriesExhausted",
                                                        2, '{"x": 1}')
    errors = json.loads(errors)
    assert [(e["kind"], e["attempt"], e["errorType"]) for e in errors] == [
        ("function", 1, "ValueError"), ("function", 2, "ValueError")]
    assert errors[0]["errorMessage"] == "something went wrong" and errors[0]["stackTrace"]
    assert enqueued_at <= failed_at
    record = json.loads(record)
    assert record["responseContext"]["functionError"] == "Unhandled"
    assert record["responsePayload"]["errorType"] == "ValueError"
    assert queue_rows(runtime.state_dir) == [(0,)]
    assert runtime.status()["functions"]["fn"]["dead_letters"] == 1


async def test_an_event_older_than_its_max_age_goes_to_the_dead_letters_without_running(
        make_runtime, tmp_path):
    runtime = await make_runtime(config_text(tmp_path, max_event_age_s=60))
    old = await runtime.async_queue.enqueue("fn", b'{"old": true}', request_id="old-one",
                                            enqueued_at=time.time() - 3600)
    await eventually(lambda: queue_rows(
        runtime.state_dir, "SELECT count(*) FROM dead_letters") == [(1,)])
    rows = queue_rows(runtime.state_dir, "SELECT request_id, condition, attempts, record "
                                         "FROM dead_letters")
    assert rows[0][:3] == (old.request_id, "EventAgeExceeded", 0)
    record = json.loads(rows[0][3])
    assert record["requestContext"]["condition"] == "EventAgeExceeded"
    assert record["requestContext"]["approximateInvokeCount"] == 0
    assert "responsePayload" not in record
    assert not (tmp_path / "out.txt").exists()


async def test_a_failure_goes_to_its_on_failure_function_as_a_lambda_record(make_runtime, tmp_path):
    text = textwrap.dedent(f"""
        state_dir: state
        functions:
          flaky: {{handler: handlers.fail, code: "{{functions}}", retries: 0,
                   on_failure: "function:catcher"}}
          catcher: {{handler: handlers.echo, code: "{{functions}}",
                     on_success: "folder:{tmp_path / 'caught'}"}}
    """)
    runtime = await make_runtime(text)
    accepted = await runtime.invoke("flaky", {"a": 1}, mode="event")
    await eventually(lambda: list((tmp_path / "caught").glob("*.json")))
    outer = json.loads(next((tmp_path / "caught").glob("*.json")).read_text())
    inner = outer["responsePayload"]  # catcher echoes the record flaky's failure produced
    assert inner["requestContext"]["requestId"] == accepted.request_id
    assert inner["requestContext"]["condition"] == "RetriesExhausted"
    assert inner["requestContext"]["approximateInvokeCount"] == 1
    assert inner["requestPayload"] == {"a": 1}
    assert inner["responsePayload"]["errorMessage"] == "something went wrong"
    assert outer["requestContext"]["requestId"] != accepted.request_id
    assert queue_rows(runtime.state_dir, "SELECT count(*) FROM dead_letters") == [(0,)]


async def test_a_full_queue_answers_with_a_throttle(make_runtime, tmp_path):
    runtime = await make_runtime(config_text(tmp_path, async_queue_size=3), run_queue=False)
    for i in range(3):
        await runtime.invoke("fn", {"i": i}, mode="event")
    with pytest.raises(TooManyRequestsException) as caught:
        await runtime.invoke("fn", {"i": 3}, mode="event")
    assert caught.value.http_status == 429
    assert "async_queue_size" in str(caught.value)
    assert queue_rows(runtime.state_dir) == [(3,)]
    assert runtime.status()["functions"]["fn"]["throttles"] == 1


async def test_a_full_queue_accepts_work_again_once_it_drains(make_runtime, tmp_path):
    runtime = await make_runtime(config_text(tmp_path, handler="queue_handlers.record_slowly",
                                             async_queue_size=2, concurrency=1))
    await runtime.invoke("fn", {"seconds": 0.2}, mode="event")
    await runtime.invoke("fn", {"seconds": 0.2}, mode="event")
    with pytest.raises(TooManyRequestsException):
        await runtime.invoke("fn", {"seconds": 0.2}, mode="event")
    await eventually(lambda: len(lines(tmp_path / "out.txt")) == 2)
    await eventually(lambda: runtime.async_queue.lanes["fn"].depth() == 0)
    assert (await runtime.invoke("fn", {"seconds": 0}, mode="event")).ok


async def test_unknown_functions_and_oversized_events_are_refused_like_lambda(make_runtime,
                                                                             tmp_path):
    runtime = await make_runtime(config_text(tmp_path))
    with pytest.raises(ResourceNotFoundException):
        await runtime.invoke("nope", {}, mode="event")
    with pytest.raises(RequestTooLargeException):
        await runtime.invoke("fn", {"blob": "x" * 300_000}, mode="event")


async def test_shutdown_finishes_in_flight_work_and_leaves_the_rest_for_the_next_start(
        make_runtime, tmp_path):
    text = config_text(tmp_path, handler="queue_handlers.record_slowly", concurrency=1)
    runtime = await make_runtime(text)
    ids = [(await runtime.invoke("fn", {"seconds": 0.3}, mode="event")).request_id
           for _ in range(4)]
    await eventually(lambda: runtime.async_queue.lanes["fn"].inflight == 1)
    await runtime.stop(grace_s=10)
    assert lines(tmp_path / "out.txt") == ids[:1]
    assert queue_rows(runtime.state_dir) == [(3,)]
    async with Runtime(config_module.load(tmp_path / "flowrun.yaml")) as again:
        await eventually(lambda: len(lines(tmp_path / "out.txt")) == 4)
        await eventually(lambda: queue_rows(again.state_dir) == [(0,)])
    assert lines(tmp_path / "out.txt") == ids


async def test_status_shows_the_queue_of_each_function(make_runtime, tmp_path):
    runtime = await make_runtime(config_text(tmp_path), run_queue=False)
    await runtime.invoke("fn", {}, mode="event")
    info = runtime.status()["functions"]["fn"]
    assert info["async_queued"] == 1
    assert {"async_retrying", "async_inflight", "dead_letters"} <= set(info)


def test_flowrun_invoke_async_without_a_daemon_queues_for_the_next_run(make_config, tmp_path):
    path = make_config(config_text(tmp_path))
    done = subprocess.run([sys.executable, "-m", "flowrun.cli", "invoke", "fn", "--async",
                           "--payload", '{"from": "cli"}', "-c", str(path)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["StatusCode"] == 202
    rows = queue_rows(tmp_path / "state", "SELECT request_id, event, status FROM queue")
    assert rows == [(answer["RequestId"], '{"from": "cli"}', "new")]
    assert not (tmp_path / "out.txt").exists()

    async def run_once() -> None:
        async with Runtime(config_module.load(path)):
            await eventually(lambda: lines(tmp_path / "out.txt") == [answer["RequestId"]])

    asyncio.run(run_once())


# ----------------------------------------------------------------------------- crashes


async def enqueue_from_this_process(path: Path, count: int, prefix: str) -> list[str]:
    """Queue ``count`` invocations the way a second process does, while a daemon may run."""
    ids = [f"{prefix}-{i:05d}" for i in range(count)]
    async with Runtime(config_module.load(path), run_queue=False) as runtime:
        for start in range(0, count, 1000):
            await asyncio.gather(*(runtime.invoke("fn", {"i": i}, mode="event", request_id=rid)
                                   for i, rid in enumerate(ids[start:start + 1000])))
    return ids


def start_daemon(path: Path, log_file: Path) -> subprocess.Popen[bytes]:
    with open(log_file, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "flowrun.cli", "run", str(path)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=REPO)


async def wait_exit(proc: subprocess.Popen[bytes], timeout_s: float = 60) -> int:
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError("daemon did not exit")
        await asyncio.sleep(0.05)
    return proc.returncode


async def test_a_daemon_killed_mid_run_runs_every_queued_invocation_at_least_once(make_config,
                                                                                 tmp_path):
    out = tmp_path / "out.txt"
    path = make_config(config_text(tmp_path, concurrency=3))
    ids = await enqueue_from_this_process(path, 10_000, "burst")
    assert queue_rows(tmp_path / "state") == [(10_000,)]

    daemon = start_daemon(path, tmp_path / "daemon.log")
    try:
        await eventually(lambda: len(lines(out)) >= 3000, timeout_s=90)
        daemon.send_signal(signal.SIGKILL)
        await wait_exit(daemon)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    await asyncio.sleep(0.5)  # workers see the daemon gone and exit after their last event
    ran_before = set(lines(out))
    assert 3000 <= len(ran_before) < 10_000
    left = {row[0] for row in queue_rows(tmp_path / "state", "SELECT request_id FROM queue")}
    in_flight = ran_before & left  # ran, but the daemon died before recording it done
    assert len(left) + len(ran_before) - len(in_flight) == 10_000  # nothing vanished

    daemon = start_daemon(path, tmp_path / "daemon.log")
    try:
        late = await enqueue_from_this_process(path, 300, "late")  # while it runs
        await eventually(lambda: set(lines(out)) >= set(ids) | set(late), timeout_s=90)
        await eventually(lambda: queue_rows(tmp_path / "state") == [(0,)], timeout_s=30)
        daemon.send_signal(signal.SIGTERM)
        assert await wait_exit(daemon) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    recorded = lines(out)
    duplicates = len(recorded) - len(set(recorded))
    assert duplicates <= len(in_flight), (duplicates, len(in_flight))
    assert len(in_flight) < 1000  # bounded by what was in flight, not a re-run of everything


POWER_CUT_CHILD = """
import asyncio, sys
from flowrun import config as config_module
from flowrun.runtime import Runtime

async def main():
    async with Runtime(config_module.load(sys.argv[1]), run_queue=False) as runtime:
        acked = 0
        while True:
            await asyncio.gather(*(runtime.invoke("fn", {"n": acked + i, "pad": "x" * 200},
                                                  mode="event") for i in range(250)))
            acked += 250
            print(acked, flush=True)

asyncio.run(main())
"""


async def test_a_kill_during_a_burst_of_enqueues_leaves_an_intact_database_with_every_ack(
        make_config, tmp_path):
    path = make_config(config_text(tmp_path, async_queue_size=10_000_000))
    child = subprocess.Popen([sys.executable, "-c", POWER_CUT_CHILD, str(path)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    assert child.stdout is not None and child.stderr is not None
    acked = 0
    try:
        loop = asyncio.get_running_loop()
        while acked < 5000:
            line = await asyncio.wait_for(loop.run_in_executor(None, child.stdout.readline), 60)
            assert line, child.stderr.read().decode()
            acked = int(line)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        rest = child.stdout.read().split()
        acked = int(rest[-1]) if rest else acked
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
        child.stderr.close()
    db = sqlite3.connect(tmp_path / "state" / "queue.db")
    try:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert db.execute("SELECT count(*) FROM queue").fetchone()[0] >= acked
    finally:
        db.close()


async def test_the_invoke_api_answers_a_full_queue_with_429(make_runtime, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    text = f"api: {{listen: '127.0.0.1:{port}'}}\n" + config_text(tmp_path, async_queue_size=2)
    await make_runtime(text, run_queue=False)
    url = f"http://127.0.0.1:{port}/2015-03-31/functions/fn/invocations"
    headers = {"X-Amz-Invocation-Type": "Event"}
    async with aiohttp.ClientSession() as session:
        statuses = []
        for _ in range(3):
            async with session.post(url, data=b"{}", headers=headers) as answer:
                statuses.append(answer.status)
                body = await answer.json(content_type=None) if answer.status != 202 else None
    assert statuses == [202, 202, 429]
    assert body is not None and "async_queue_size" in json.dumps(body)


def test_flowrun_status_without_a_daemon_shows_queued_work_and_pipelines(make_config, tmp_path):
    text = config_text(tmp_path, on_success="function:next") + (
        '  next: {"handler": "handlers.noop", "code": "{functions}"}\n')
    path = make_config(text)

    async def queue_two() -> None:
        async with Runtime(config_module.load(path), run_queue=False) as runtime:
            await runtime.invoke("fn", {}, mode="event")
            await runtime.invoke("fn", {}, mode="event")

    asyncio.run(queue_two())
    done = subprocess.run([sys.executable, "-m", "flowrun.cli", "status", "-c", str(path)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "pipeline fn:" in done.stdout
    step = next(line for line in done.stdout.splitlines() if line.strip().startswith("fn "))
    assert "-> next" in step and "queued=2" in step


async def test_a_system_error_is_retried_without_using_retries_until_the_event_is_too_old(
        make_runtime, tmp_path):
    runtime = await make_runtime(config_text(tmp_path, python="/nonexistent/python3",
                                             max_event_age_s=60, retries=0))
    await runtime.async_queue.enqueue("fn", b"{}", request_id="no-worker",
                                      enqueued_at=time.time() - 59.0)
    await eventually(lambda: queue_rows(
        runtime.state_dir, "SELECT count(*) FROM dead_letters") == [(1,)])
    condition, attempts, errors = queue_rows(
        runtime.state_dir, "SELECT condition, attempts, errors FROM dead_letters")[0]
    assert (condition, attempts) == ("EventAgeExceeded", 0)  # retries: 0 did not stop it
    kinds = [e["kind"] for e in json.loads(errors)]
    assert kinds and set(kinds) == {"system"}


async def test_a_destination_that_cannot_take_the_record_leaves_a_dead_letter_instead(
        make_runtime, tmp_path):
    (tmp_path / "blocker").write_text("a file where a folder should be")
    runtime = await make_runtime(config_text(
        tmp_path, handler="handlers.echo",
        on_success=[f"folder:{tmp_path / 'blocker' / 'sub'}", f"folder:{tmp_path / 'ok'}"]))
    accepted = await runtime.invoke("fn", {"keep": "me"}, mode="event")
    await eventually(lambda: queue_rows(
        runtime.state_dir, "SELECT count(*) FROM dead_letters") == [(1,)])
    await eventually(lambda: queue_rows(runtime.state_dir) == [(0,)])
    assert len(list((tmp_path / "ok").glob("*.json"))) == 1  # the other destination got it
    request_id, condition, errors, record = queue_rows(
        runtime.state_dir, "SELECT request_id, condition, errors, record FROM dead_letters")[0]
    assert (request_id, condition) == (accepted.request_id, "Success")
    [error] = json.loads(errors)
    assert error["kind"] == "destination" and "blocker" in error["destination"]
    assert json.loads(record)["responsePayload"] == {"keep": "me"}
