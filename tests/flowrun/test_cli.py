"""The ``flowrun`` command, run for real in subprocesses, with and without a daemon."""

from __future__ import annotations

import csv
import io
import json
import queue
import signal
import subprocess
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from daemon_process import (
    Daemon,
    children_of,
    flowrun_command,
    free_port,
    is_alive,
    run_flowrun,
    wait_until,
)

FUNCTIONS = Path(__file__).parents[1] / "functions"
COMMANDS = ("run", "validate", "schema", "invoke", "report", "logs", "status")


def write_config(folder: Path, api: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "flowrun.yaml"
    path.write_text(textwrap.dedent(f"""\
        state_dir: state
        api: {{listen: "{api or f'127.0.0.1:{free_port()}'}"}}
        shutdown_grace_s: 10
        defaults:
          code: "{FUNCTIONS}"
        functions:
          greet: {{handler: lifecycle_handlers.greet}}
          fail: {{handler: lifecycle_handlers.fail}}
          sleepy: {{handler: lifecycle_handlers.sleep_then_pid, timeout_s: 30}}
    """))
    return path


def json_out(done: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(done.stdout)


def report_fields(line: str) -> dict[str, str]:
    """``REPORT RequestId: x<TAB>Duration: 1.00 ms<TAB>...`` → {"RequestId": "x", ...}."""
    assert line.startswith("REPORT ")
    fields = {}
    for part in line[len("REPORT "):].split("\t"):
        key, _, value = part.partition(": ")
        fields[key] = value
    return fields


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "pipeline")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One ``flowrun run`` for the tests that talk to a running daemon."""
    api = f"127.0.0.1:{free_port()}"
    path = write_config(tmp_path_factory.mktemp("daemon"), api)
    running = Daemon.start(path, api)
    yield running
    running.kill()


# --------------------------------------------------------------------------- help


def test_the_top_level_help_lists_every_command() -> None:
    done = run_flowrun("--help")
    assert done.returncode == 0
    for command in COMMANDS:
        assert command in done.stdout
    assert "examples:" in done.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    done = run_flowrun(command, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: flowrun {command}")


def test_an_unknown_command_is_a_usage_error() -> None:
    done = run_flowrun("launch")
    assert done.returncode == 2
    assert "invalid choice: 'launch'" in done.stderr


# --------------------------------------------------------------------------- validate, schema


def test_validate_prints_a_one_line_summary_and_exits_0(config: Path) -> None:
    done = run_flowrun("validate", cwd=config.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "flowrun.yaml: ok — 3 functions, 0 triggers\n"


def test_validate_summarises_the_example_with_its_triggers() -> None:
    example = Path(__file__).parents[2] / "configs" / "flowrun.yaml"
    done = run_flowrun("validate", str(example))
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{example}: ok — 3 functions, 3 triggers (1 cron, 1 file, 1 http)\n"


def test_validate_lists_every_error_with_file_and_line_and_exits_1(tmp_path: Path) -> None:
    (tmp_path / "flowrun.yaml").write_text(textwrap.dedent("""\
        functions:
          summarize:
            handler: summarize.handler
            memory_mb: lots
            colour: blue
        triggers:
          - {type: http, function: nobody, path: /x}
    """))
    done = run_flowrun("validate", "-c", "flowrun.yaml", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert lines[0] == ("flowrun.yaml:4: functions.summarize.memory_mb: expected a whole number "
                        "of MB, got 'lots'")
    assert lines[1].startswith("flowrun.yaml:5: functions.summarize.colour: unknown key; "
                               "valid keys: ")
    assert lines[2] == ("flowrun.yaml:7: triggers[0].function: no function named 'nobody'; "
                        "defined: summarize")
    assert len(lines) == 3


def test_validate_of_a_missing_file_exits_1(tmp_path: Path) -> None:
    done = run_flowrun("validate", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr == "flowrun.yaml: no such file; pass a config path or create flowrun.yaml\n"


def test_schema_prints_a_valid_json_schema() -> None:
    done = run_flowrun("schema")
    assert done.returncode == 0, done.stderr
    schema = json_out(done)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert {"functions", "triggers"} <= set(schema["properties"])


# --------------------------------------------------------------------------- invoke, no daemon


def test_invoke_without_a_daemon_runs_the_function_here(config: Path) -> None:
    done = run_flowrun("invoke", "greet", "--payload", '{"name": "edge"}', "-c", str(config))
    assert done.returncode == 0, done.stderr
    assert json_out(done) == {"greeting": "hello edge"}
    assert "no daemon answering; invoking in this process" in done.stderr
    assert (config.parent / "state" / "ledger.db").exists()


def test_invoke_reads_the_payload_from_a_file_or_stdin(config: Path) -> None:
    event = config.parent / "event.json"
    event.write_text('{"name": "file"}')
    done = run_flowrun("invoke", "greet", "-p", f"@{event}", "-c", str(config))
    assert (done.returncode, json_out(done)) == (0, {"greeting": "hello file"})
    done = run_flowrun("invoke", "greet", "-p", "@-", "-c", str(config),
                       input_text='{"name": "stdin"}')
    assert (done.returncode, json_out(done)) == (0, {"greeting": "hello stdin"})


def test_invoke_prints_the_log_with_logs(config: Path) -> None:
    done = run_flowrun("invoke", "greet", "-p", '{"name": "log"}', "--logs", "-c", str(config))
    assert done.returncode == 0
    assert "greeting log" in done.stderr


def test_a_function_error_exits_1_with_the_error_document(config: Path) -> None:
    done = run_flowrun("invoke", "fail", "-p", '{"n": 1}', "-c", str(config))
    assert done.returncode == 1
    error = json_out(done)
    assert error["errorType"] == "RuntimeError"
    assert error["errorMessage"] == "no luck with {'n': 1}"
    assert any("lifecycle_handlers.py" in frame for frame in error["stackTrace"])


def test_invoking_an_unknown_function_exits_1(config: Path) -> None:
    done = run_flowrun("invoke", "nosuch", "-c", str(config))
    assert done.returncode == 1
    error = json_out(done)
    assert error["errorType"] == "ResourceNotFoundException"
    assert "defined: fail, greet, sleepy" in error["message"]


def test_a_payload_that_is_not_json_exits_1_without_invoking(config: Path) -> None:
    done = run_flowrun("invoke", "greet", "-p", "{name: edge}", "-c", str(config))
    assert done.returncode == 1
    assert done.stderr.startswith("flowrun invoke: --payload is not valid JSON: ")
    assert not (config.parent / "state" / "ledger.db").exists()


# --------------------------------------------------------------------------- report, logs (no daemon)


def test_report_as_table_json_and_csv_after_some_invocations(config: Path) -> None:
    for payload in ('{"name": "a"}', '{"name": "b"}'):
        assert run_flowrun("invoke", "greet", "-p", payload, "-c", str(config)).returncode == 0
    assert run_flowrun("invoke", "fail", "-c", str(config)).returncode == 1

    as_json = {r["function"]: r for r in json_out(run_flowrun("report", "--format", "json",
                                                             "-c", str(config)))}
    assert set(as_json) == {"greet", "fail"}
    assert (as_json["greet"]["invocations"], as_json["greet"]["errors"]) == (2, 0)
    assert (as_json["fail"]["invocations"], as_json["fail"]["errors"]) == (1, 1)
    assert as_json["greet"]["cold_starts"] == 2  # each local invoke starts its own worker
    assert as_json["greet"]["gb_seconds"] == pytest.approx(
        as_json["greet"]["billed_ms"] / 1000 * 128 / 1024)

    rows = list(csv.DictReader(io.StringIO(
        run_flowrun("report", "--format", "csv", "-c", str(config)).stdout)))
    assert [(r["function"], r["invocations"]) for r in rows] == [("fail", "1"), ("greet", "2")]

    table = run_flowrun("report", "-c", str(config), "--since", "1h").stdout.splitlines()
    assert table[0].split()[:2] == ["function", "invocations"]
    assert [line.split()[0] for line in table[1:3]] == ["fail", "greet"]
    assert table[-1].startswith("total: 3 invocations, ")

    only = json_out(run_flowrun("report", "--format", "json", "--function", "fail",
                                "-c", str(config)))
    assert [r["function"] for r in only] == ["fail"]


def test_report_rejects_a_bad_since_and_says_what_is_valid(config: Path) -> None:
    done = run_flowrun("report", "--since", "yesterday", "-c", str(config))
    assert done.returncode == 1
    assert done.stderr == ("flowrun report: --since: expected a duration like 30s, 15m, 1h, 2d "
                           "or 1w, got 'yesterday'\n")


def test_report_with_no_invocations_says_so(config: Path) -> None:
    done = run_flowrun("report", "-c", str(config))
    assert (done.returncode, done.stdout) == (0, "no invocations in this period\n")


def test_logs_prints_start_end_and_a_tab_separated_report(config: Path) -> None:
    assert run_flowrun("invoke", "greet", "-p", '{"name": "logs"}', "-c", str(config)).returncode == 0
    done = run_flowrun("logs", "greet", "-c", str(config))
    assert done.returncode == 0
    start, printed, end, report = done.stdout.splitlines()
    assert start.startswith("START RequestId: ") and start.endswith(" Version: $LATEST")
    request_id = start.split()[2]
    assert printed == "greeting logs"
    assert end == f"END RequestId: {request_id}"
    fields = report_fields(report)
    assert list(fields) == ["RequestId", "Duration", "Billed Duration", "Memory Size",
                            "Max Memory Used", "Init Duration"]
    assert fields["RequestId"] == request_id
    assert fields["Duration"].endswith(" ms") and float(fields["Duration"][:-3]) >= 0
    assert fields["Billed Duration"].endswith(" ms") and int(fields["Billed Duration"][:-3]) >= 1
    assert fields["Memory Size"] == "128 MB"
    assert fields["Max Memory Used"].endswith(" MB")
    assert float(fields["Init Duration"][:-3]) > 0


def test_logs_of_an_unknown_function_exits_1(config: Path) -> None:
    done = run_flowrun("logs", "nosuch", "-c", str(config))
    assert done.returncode == 1
    assert "no function named 'nosuch'; defined: fail, greet, sleepy" in done.stderr


def test_status_without_a_daemon_says_it_is_not_running(config: Path) -> None:
    done = run_flowrun("status", "-c", str(config))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("flowrun: not running (no daemon answering for ")
    status = json_out(run_flowrun("status", "--json", "-c", str(config)))
    assert status["running"] is False
    assert status["functions"] == ["fail", "greet", "sleepy"]
    assert "limits" in status


# --------------------------------------------------------------------------- through a daemon


def test_invoke_goes_through_a_running_daemon(daemon: Daemon) -> None:
    config = daemon.log_path.parent / "flowrun.yaml"
    done = run_flowrun("invoke", "greet", "-p", '{"name": "daemon"}', "--logs", "-c", str(config))
    assert done.returncode == 0, done.stderr
    assert json_out(done) == {"greeting": "hello daemon"}
    assert "no daemon answering" not in done.stderr
    assert "START RequestId: " in done.stderr and "greeting daemon" in done.stderr
    failed = run_flowrun("invoke", "fail", "-c", str(config))
    assert failed.returncode == 1
    assert json_out(failed)["errorType"] == "RuntimeError"
    assert daemon.status()["functions"]["greet"]["invocations"] >= 1


def test_warm_invocations_through_the_daemon_report_init_duration_only_once(
        daemon: Daemon) -> None:
    config = daemon.log_path.parent / "flowrun.yaml"
    for _ in range(2):
        assert run_flowrun("invoke", "sleepy", "-p", '{"seconds": 0}', "-c",
                           str(config)).returncode == 0

    def reports() -> list[dict[str, str]] | None:
        out = run_flowrun("logs", "sleepy", "-c", str(config)).stdout.splitlines()
        found = [report_fields(line) for line in out if line.startswith("REPORT ")]
        return found if len(found) >= 2 else None

    first, second = wait_until(reports, 30, "two REPORT lines")[:2]
    assert "Init Duration" in first
    assert "Init Duration" not in second


def test_status_with_a_daemon_shows_it_running(daemon: Daemon) -> None:
    config = daemon.log_path.parent / "flowrun.yaml"
    done = run_flowrun("status", "-c", str(config))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"flowrun: running, pid {daemon.process.pid}, up ")
    assert "greet" in done.stdout
    status = json_out(run_flowrun("status", "--json", "-c", str(config)))
    assert status["running"] is True and status["pid"] == daemon.process.pid
    assert set(status["functions"]) == {"greet", "fail", "sleepy"}


def test_logs_follow_prints_new_lines_as_they_come(daemon: Daemon) -> None:
    config = daemon.log_path.parent / "flowrun.yaml"
    follower = subprocess.Popen([*flowrun_command(), "logs", "greet", "--follow", "-c",
                                 str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert follower.stdout is not None
        for line in follower.stdout:
            lines.put(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        status, body = daemon.invoke("greet", {"name": "follower"})
        assert (status, body) == (200, {"greeting": "hello follower"})
        seen: list[str] = []
        while "greeting follower" not in seen:
            seen.append(lines.get(timeout=30))
        report = lines.get(timeout=30)
        while not report.startswith("REPORT "):
            report = lines.get(timeout=30)
        assert report_fields(report)["Memory Size"] == "128 MB"
    finally:
        follower.send_signal(signal.SIGINT)
        code = follower.wait(30)
        reader.join(30)
        assert follower.stdout is not None and follower.stderr is not None
        follower.stdout.close()
        follower.stderr.close()
    assert code == 0


def test_flowrun_run_stops_gracefully_on_sigterm_and_leaves_no_workers(tmp_path: Path) -> None:
    api = f"127.0.0.1:{free_port()}"
    config = write_config(tmp_path, api)
    daemon = Daemon.start(config, api)
    try:
        for name in ("greet", "sleepy"):
            assert daemon.invoke(name, {"seconds": 0})[0] == 200
        workers = children_of(daemon.process.pid)
        assert len(workers) >= 2
        code = daemon.stop()
    finally:
        daemon.kill()
    assert code == 0, daemon.output()
    output = daemon.output()
    assert output.startswith("flowrun: 3 functions (greet, fail, sleepy), 0 triggers; state in ")
    assert "\nevent loop: uvloop\n" in output  # installed with flowrun: the default picks it
    assert output.rstrip().endswith("flowrun: stopped")
    wait_until(lambda: not any(is_alive(pid) for pid in workers), 10, "the workers to exit")


def test_flowrun_run_on_asyncios_own_loop_when_asked(tmp_path: Path) -> None:
    api = f"127.0.0.1:{free_port()}"
    daemon = Daemon.start(write_config(tmp_path, api), api, extra_args=("--loop", "asyncio"))
    try:
        status, body = daemon.invoke("greet", {"name": "loop"})
        assert status == 200, body
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    assert "\nevent loop: asyncio\n" in daemon.output()
