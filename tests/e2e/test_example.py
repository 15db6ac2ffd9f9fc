"""The example in configs/, run for real: ``flowrun run configs/flowrun.yaml``.

Real public CSV files (the ones shipped with the vega-datasets package) are dropped into the
inbox; the summaries that appear in the outbox are checked against pandas' own reading of
the same files. ``curl`` calls the HTTP route, and the ledger accounts for everything.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import vega_datasets
from daemon_process import Daemon, free_port, run_flowrun, wait_until

EXAMPLE = Path(__file__).parents[2] / "configs"
VEGA_DATA = Path(vega_datasets.__file__).parent / "_data"
CSV_FILES = ("seattle-weather.csv", "la-riots.csv")  # la-riots has empty cells
SUMMARY_TIMEOUT_S = 90


def copy_example(target: Path) -> Path:
    """configs/ without any state or outputs of a local run."""
    shutil.copytree(EXAMPLE, target, ignore=shutil.ignore_patterns(
        ".flowrun", "__pycache__", "*.json", "*.log", "*.csv"))
    return target / "flowrun.yaml"


@pytest.fixture
def example(tmp_path: Path) -> Iterator[tuple[Daemon, Path, dict[str, str]]]:
    config = copy_example(tmp_path / "configs")
    api, http = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = {"FLOWRUN_API_LISTEN": api, "FLOWRUN_HTTP_LISTEN": http}
    elsewhere = tmp_path / "elsewhere"  # relative paths must not depend on the cwd
    elsewhere.mkdir()
    daemon = Daemon.start(config, api, env, cwd=elsewhere)
    yield daemon, config, {**env, "http": http}
    daemon.kill()


def expected_summary(path: Path) -> dict[str, Any]:
    """The figures, computed by pandas rather than by the csv module the handler uses."""
    frame = pd.read_csv(path)
    numeric = frame.select_dtypes("number")
    return {
        "rows": len(frame),
        "columns": len(frame.columns),
        "column_names": list(frame.columns),
        "numeric": {
            str(name): {"count": int(column.count()), "min": float(column.min()),
                        "max": float(column.max()), "mean": float(column.mean())}
            for name, column in numeric.items()
        },
    }


def check_summary(summary: dict[str, Any], source: Path) -> None:
    expected = expected_summary(source)
    assert summary["file"] == source.name
    for key in ("rows", "columns", "column_names"):
        assert summary[key] == expected[key], key
    assert set(summary["numeric"]) == set(expected["numeric"])
    for name, stats in expected["numeric"].items():
        got = summary["numeric"][name]
        assert got["count"] == stats["count"], name
        assert got["min"] == pytest.approx(stats["min"]), name
        assert got["max"] == pytest.approx(stats["max"]), name
        assert got["mean"] == pytest.approx(stats["mean"], rel=1e-9), name


def report(config: Path) -> dict[str, dict[str, Any]]:
    done = run_flowrun("report", "--format", "json", "-c", str(config))
    assert done.returncode == 0, done.stderr
    return {row["function"]: row for row in json.loads(done.stdout)}


def test_csv_files_dropped_in_the_inbox_are_summarised_into_the_outbox(example: Any) -> None:
    daemon, config, _ = example
    inbox, outbox = config.parent / "data" / "inbox", config.parent / "data" / "outbox"
    for name in CSV_FILES:
        shutil.copy(VEGA_DATA / name, inbox / name)
    (inbox / "notes.txt").write_text("not a CSV: the trigger's patterns leave it alone\n")

    for name in CSV_FILES:
        summary_path = outbox / f"{Path(name).stem}.json"
        wait_until(summary_path.exists, SUMMARY_TIMEOUT_S, f"{summary_path.name} in the outbox")
        check_summary(json.loads(summary_path.read_text()), VEGA_DATA / name)
    assert sorted(p.name for p in outbox.iterdir() if not p.name.startswith(".")) == [
        "la-riots.json", "seattle-weather.json"]

    def summarised() -> dict[str, Any] | None:
        rows = report(config)
        return rows if rows.get("summarize", {}).get("invocations") == len(CSV_FILES) else None

    rows = wait_until(summarised, 30, "the ledger to account for both summaries")
    assert rows["summarize"]["errors"] == 0
    logs = run_flowrun("logs", "summarize", "-c", str(config)).stdout
    assert "summarised " in logs and "seattle-weather.csv: 1461 rows, 6 columns" in logs
    assert logs.count("REPORT RequestId: ") == len(CSV_FILES)

    # A restart neither repeats nor loses the files already summarised.
    assert daemon.stop() == 0, daemon.output()
    restarted = Daemon.start(config, daemon.api, {k: v for k, v in example[2].items()
                                                 if k != "http"})
    try:
        def rescanned() -> dict[str, Any] | None:
            found = next((t for t in restarted.status().get("triggers", [])
                          if t["type"] == "file"), None)
            if found is None:  # the daemon answers before its triggers have started
                return None
            return found if found["scans"] >= 1 and found["pending"] == 0 else None

        file_trigger = wait_until(rescanned, 30, "the file trigger to scan the inbox")
        assert (file_trigger["state"], file_trigger["invoked"]) == ("running", 0)
        assert restarted.stop() == 0, restarted.output()
    finally:
        restarted.kill()
    assert report(config)["summarize"]["invocations"] == len(CSV_FILES)
    assert not any((config.parent.parent / "elsewhere").iterdir())


def test_post_hello_answers_a_greeting_over_http(example: Any) -> None:
    daemon, config, env = example
    done = subprocess.run(
        ["curl", "-sS", "-i", "-X", "POST", f"http://{env['http']}/hello",
         "-H", "content-type: application/json", "-d", '{"name": "edge"}', "--max-time", "30"],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    head, _, body = done.stdout.replace("\r\n", "\n").partition("\n\n")
    assert head.splitlines()[0].split()[1] == "200"
    assert "content-type: application/json" in head.lower()
    greeting = json.loads(body)
    assert greeting["message"] == "Hello, edge!"
    assert (greeting["method"], greeting["path"]) == ("POST", "/hello")

    wrong_method = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", f"http://{env['http']}/hello",
         "--max-time", "30"], capture_output=True, text=True, timeout=60, check=False)
    assert wrong_method.stdout == "404"  # as API Gateway: no route for GET /hello

    by_query = subprocess.run(
        ["curl", "-sS", "-X", "POST", f"http://{env['http']}/hello?name=query", "--max-time",
         "30"], capture_output=True, text=True, timeout=60, check=False)
    assert json.loads(by_query.stdout)["message"] == "Hello, query!"

    def accounted() -> dict[str, Any] | None:
        row = report(config).get("hello")
        return row if row and row["invocations"] == 2 else None

    row = wait_until(accounted, 30, "the ledger to account for the greeting")
    assert (row["errors"], row["cold_starts"]) == (0, 1)
    assert row["gb_seconds"] == pytest.approx(row["billed_ms"] / 1000 * 128 / 1024)


def test_the_heartbeat_is_scheduled_every_minute_and_writes_its_line(example: Any) -> None:
    daemon, config, _ = example
    cron = next(t for t in daemon.status()["triggers"] if t["type"] == "cron")
    assert (cron["function"], cron["schedule"], cron["state"]) == (
        "heartbeat", "rate(1 minute)", "running")
    next_fire = dt.datetime.fromisoformat(cron["next_fire"].replace("Z", "+00:00"))
    assert dt.timedelta(0) < next_fire - dt.datetime.now(dt.UTC) <= dt.timedelta(
        seconds=61)

    scheduled = {"version": "0", "id": "e2e", "detail-type": "Scheduled Event",
                 "source": "aws.events", "time": "2026-01-01T00:00:00Z", "detail": {}}
    status, beat = daemon.invoke("heartbeat", scheduled)
    assert status == 200, beat
    assert beat["scheduled"] == "2026-01-01T00:00:00Z"
    line = (config.parent / "data" / "heartbeat.log").read_text().splitlines()[-1]
    assert line.startswith(beat["time"]) and "scheduled=2026-01-01T00:00:00Z" in line
