"""Pipelines: steps chained through on_success destinations, fan-out, status, validation."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from waiting import eventually

from flowrun import config as config_module
from flowrun import pipeline
from flowrun.config import ConfigError
from flowrun.runtime import Runtime

REPO = Path(__file__).resolve().parents[2]

STEPS = """
state_dir: state
defaults:
  code: "{functions}"
  permissions: {user: root}
  environment: {OUT_DIR: "@OUT@", OUT_FILE: "@OUT@/ids.txt"}
functions:
  split:
    handler: queue_handlers.split_words
    on_success: [function:count, function:upper]
  count:
    handler: queue_handlers.count_words
    on_success: function:save
  upper: {handler: queue_handlers.upper_words}
  save: {handler: queue_handlers.save_count}
  ids: {handler: queue_handlers.record}
  first:
    handler: handlers.echo
    on_success: function:ids
"""




async def test_three_steps_with_fan_out_produce_every_output(make_runtime, tmp_path):
    runtime = await make_runtime(STEPS.replace("@OUT@", str(tmp_path / "out")))
    await runtime.invoke("split", {"text": "one two three four"}, mode="event")
    await eventually(lambda: (tmp_path / "out" / "count.json").exists()
                     and (tmp_path / "out" / "upper.json").exists())
    count = json.loads((tmp_path / "out" / "count.json").read_text())
    assert count["count"] == 4
    upper = json.loads((tmp_path / "out" / "upper.json").read_text())
    assert upper == ["ONE", "TWO", "THREE", "FOUR"]
    await eventually(lambda: runtime.async_queue.succeeded == 4)


async def test_a_step_run_again_hands_the_next_step_the_same_request_id(make_runtime, tmp_path):
    runtime = await make_runtime(STEPS.replace("@OUT@", str(tmp_path / "out")))
    (tmp_path / "out").mkdir()
    await runtime.invoke("first", {"n": 1}, mode="event", request_id="step-one")
    await runtime.invoke("first", {"n": 1}, mode="event", request_id="step-one")
    ids = tmp_path / "out" / "ids.txt"
    await eventually(lambda: ids.exists() and len(ids.read_text().split()) == 2)
    first, second = ids.read_text().split()
    assert first == second != "step-one"


async def test_status_shows_each_pipelines_steps_and_their_queues(make_runtime, tmp_path):
    runtime = await make_runtime(STEPS.replace("@OUT@", str(tmp_path / "out")), run_queue=False)
    await runtime.invoke("split", {"text": "a"}, mode="event")
    described = runtime.status()["pipelines"]
    assert [p["name"] for p in described] == ["split", "first"]
    steps = described[0]["steps"]
    assert [s["function"] for s in steps] == ["split", "count", "upper", "save"]
    assert steps[0]["next"] == ["count", "upper"]
    assert steps[0]["on_failure"] == ["dlq"]
    assert steps[0]["async_queued"] == 1 and steps[1]["async_queued"] == 0
    lines = pipeline.render(described)
    assert lines[0] == "pipeline split:"
    assert "split" in lines[1] and "-> count, upper" in lines[1] and "queued=1" in lines[1]


def test_a_destination_naming_an_unknown_function_is_a_config_error(make_config):
    path = make_config("""
        functions:
          a: {handler: handlers.echo, code: ".", on_success: [function:b, function:nope]}
          b: {handler: handlers.echo, code: "."}
    """)
    with pytest.raises(ConfigError) as caught:
        config_module.load(path)
    message = str(caught.value)
    assert "functions.a.on_success[1]" in message
    assert "no function named 'nope'; defined: a, b" in message


async def test_a_csv_dropped_in_the_example_folder_flows_through_the_example_pipeline(tmp_path):
    environ = {**os.environ, "FLOWRUN_STATE_DIR": str(tmp_path / "state"),
               "READINGS_DIR": str(tmp_path / "readings"), "STAGING_DIR": str(tmp_path / "stage"),
               "ARCHIVE_DIR": str(tmp_path / "archive"), "REPORT_DIR": str(tmp_path / "reports")}
    (tmp_path / "readings").mkdir()
    config = config_module.load(REPO / "configs" / "pipeline.yaml", environ=environ)
    async with Runtime(config) as runtime:
        described = runtime.status()["pipelines"]
        assert [s["function"] for s in described[0]["steps"]] == ["parse", "stats", "archive",
                                                                 "report"]
        temp = tmp_path / "readings" / ".part"
        temp.write_text("sensor,temp_c,humidity\na,20.5,40\nb,22.5,60\nc,21,50\n")
        temp.rename(tmp_path / "readings" / "greenhouse.csv")
        report_file = tmp_path / "reports" / "greenhouse.json"
        archive_file = tmp_path / "archive" / "greenhouse.jsonl"
        await eventually(lambda: report_file.exists() and archive_file.exists())
        report = json.loads(report_file.read_text())
        assert report["rows"] == 3
        assert report["columns"] == {"temp_c": {"min": 20.5, "max": 22.5, "mean": 21.333333},
                                     "humidity": {"min": 40.0, "max": 60.0, "mean": 50.0}}
        archived = [json.loads(line) for line in archive_file.read_text().splitlines()]
        assert archived[0] == {"sensor": "a", "temp_c": "20.5", "humidity": "40"}
        await eventually(lambda: runtime.async_queue.succeeded == 4)


async def test_a_real_csv_larger_than_an_async_event_flows_through_by_reference(tmp_path):
    import csv

    import vega_datasets

    source = Path(vega_datasets.__file__).parent / "_data" / "sf-temps.csv"  # about 214 KB
    with open(source, newline="") as file:
        expected = list(csv.DictReader(file))
    environ = {**os.environ, "FLOWRUN_STATE_DIR": str(tmp_path / "state"),
               "READINGS_DIR": str(tmp_path / "readings"), "STAGING_DIR": str(tmp_path / "stage"),
               "ARCHIVE_DIR": str(tmp_path / "archive"), "REPORT_DIR": str(tmp_path / "reports")}
    (tmp_path / "readings").mkdir()
    config = config_module.load(REPO / "configs" / "pipeline.yaml", environ=environ)
    async with Runtime(config, serve_api=False) as runtime:
        (tmp_path / "readings" / "sf-temps.csv").write_bytes(source.read_bytes())
        report_file = tmp_path / "reports" / "sf-temps.json"
        archive_file = tmp_path / "archive" / "sf-temps.jsonl"
        await eventually(lambda: report_file.exists() and archive_file.exists())
        report = json.loads(report_file.read_text())
        assert report["rows"] == len(expected)
        temps = [float(row["temp"]) for row in expected]
        assert report["columns"]["temp"]["max"] == max(temps)
        assert len(archive_file.read_text().splitlines()) == len(expected)
        functions = runtime.status()["functions"]
        assert all(functions[name]["dead_letters"] == 0 for name in functions)
