"""Dead letters: kept with every error, listed, shown, redriven and purged with `flowrun dlq`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from waiting import eventually

REPO = Path(__file__).resolve().parents[2]


def config_text(tmp_path: Path) -> str:
    env = json.dumps({"OUT_FILE": str(tmp_path / "out.txt"), "FLAG_FILE": str(tmp_path / "flag")})
    return f"""
state_dir: state
functions:
  fixable: {{handler: queue_handlers.needs_flag, code: "{{functions}}", retries: 1,
            retry_backoff_s: [0.05], permissions: {{user: root}}, environment: {env}}}
  other: {{handler: handlers.fail, code: "{{functions}}", retries: 0}}
"""


def flowrun(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flowrun.cli", *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO)




def dead(runtime) -> dict[str, int]:
    return {name: runtime.async_queue.lanes[name].dead_letters for name in ("fixable", "other")}


def out_lines(tmp_path: Path) -> list[str]:
    path = tmp_path / "out.txt"
    return path.read_text().split() if path.exists() else []


async def test_a_redriven_dead_letter_succeeds_once_the_handler_is_fixed(make_runtime, tmp_path):
    runtime = await make_runtime(config_text(tmp_path))
    config = str(tmp_path / "flowrun.yaml")
    accepted = await runtime.invoke("fixable", {"order": 42}, mode="event")
    await eventually(lambda: dead(runtime)["fixable"] == 1)
    assert out_lines(tmp_path) == [accepted.request_id] * 2  # first try and one retry

    listing = flowrun("dlq", "list", "fixable", "-c", config)
    assert listing.returncode == 0, listing.stderr
    assert accepted.request_id in listing.stdout and "RetriesExhausted" in listing.stdout
    assert "the flag file is missing" in listing.stdout

    shown = flowrun("dlq", "show", accepted.request_id, "-c", config)
    assert shown.returncode == 0, shown.stderr
    letter = json.loads(shown.stdout)
    assert letter["event"] == {"order": 42}
    assert letter["attempts"] == 2
    assert [e["errorType"] for e in letter["errors"]] == ["ValueError", "ValueError"]
    assert all(e["at"].endswith("Z") for e in letter["errors"])
    assert letter["enqueuedAt"] <= letter["failedAt"]
    assert letter["record"]["requestContext"]["approximateInvokeCount"] == 2
    assert flowrun("dlq", "show", str(letter["id"]), "-c", config).stdout == shown.stdout

    (tmp_path / "flag").write_text("fixed")
    redriven = flowrun("dlq", "redrive", "fixable", "-c", config)
    assert redriven.returncode == 0, redriven.stderr
    assert "1 dead letter queued again" in redriven.stdout
    await eventually(lambda: len(out_lines(tmp_path)) == 3)  # the running queue picked it up
    assert out_lines(tmp_path) == [accepted.request_id] * 3  # the same request id
    await eventually(lambda: dead(runtime)["fixable"] == 0)
    assert runtime.async_queue.succeeded == 1
    assert "no dead letters" in flowrun("dlq", "list", "-c", config).stdout


async def test_a_letter_that_fails_again_after_redrive_lists_the_errors_of_both_rounds(
        make_runtime, tmp_path):
    runtime = await make_runtime(config_text(tmp_path))
    accepted = await runtime.invoke("fixable", {}, mode="event")
    await eventually(lambda: dead(runtime)["fixable"] == 1)
    assert flowrun("dlq", "redrive", accepted.request_id, "-c",
                   str(tmp_path / "flowrun.yaml")).returncode == 0
    await eventually(lambda: len(out_lines(tmp_path)) == 4)
    await eventually(lambda: dead(runtime)["fixable"] == 1)
    letter = json.loads(flowrun("dlq", "show", accepted.request_id, "-c",
                                str(tmp_path / "flowrun.yaml")).stdout)
    assert [e["kind"] for e in letter["errors"]] == ["function", "function", "redrive",
                                                     "function", "function"]


async def test_purge_removes_one_functions_dead_letters_or_all(make_runtime, tmp_path):
    runtime = await make_runtime(config_text(tmp_path))
    config = str(tmp_path / "flowrun.yaml")
    await runtime.invoke("other", {}, mode="event")
    await runtime.invoke("other", {}, mode="event")
    await runtime.invoke("fixable", {}, mode="event")
    await eventually(lambda: dead(runtime) == {"fixable": 1, "other": 2})
    purged = flowrun("dlq", "purge", "--function", "other", "-c", config)
    assert "2 dead letters purged" in purged.stdout
    remaining = flowrun("dlq", "list", "--json", "-c", config).stdout.splitlines()
    assert [json.loads(line)["function"] for line in remaining] == ["fixable"]
    assert "1 dead letter purged" in flowrun("dlq", "purge", "-c", config).stdout
    await eventually(lambda: dead(runtime) == {"fixable": 0, "other": 0})


def test_dlq_commands_name_what_they_cannot_find(make_config, tmp_path):
    config = str(make_config(config_text(tmp_path)))
    missing = flowrun("dlq", "show", "12345", "-c", config)
    assert missing.returncode == 1 and "no dead letter '12345'" in missing.stderr
    unknown = flowrun("dlq", "redrive", "nothing-like-it", "-c", config)
    assert unknown.returncode == 1
    assert "neither a function nor a dead letter" in unknown.stderr
    assert "fixable, other" in unknown.stderr


async def test_a_record_sent_to_the_dlq_destination_is_kept_and_can_be_redriven(make_runtime,
                                                                               tmp_path):
    runtime = await make_runtime(config_text(tmp_path))
    record = {
        "version": "1.0", "timestamp": "2026-12-03T10:00:00.000Z",
        "requestContext": {"requestId": "from-a-trigger",
                           "functionArn": "arn:aws:lambda:us-east-1:000000000000:function:fixable",
                           "condition": "RetryAttemptsExhausted", "approximateInvokeCount": 3},
        "responseContext": {"statusCode": 200, "functionError": "Unhandled"},
        "responsePayload": {"errorType": "ValueError", "errorMessage": "bad batch"},
        "requestPayload": {"records": [1, 2]},
    }
    await runtime.destinations.send("dlq", record)
    assert dead(runtime)["fixable"] == 1
    config = str(tmp_path / "flowrun.yaml")
    letter = json.loads(flowrun("dlq", "show", "from-a-trigger", "-c", config).stdout)
    assert (letter["function"], letter["condition"], letter["attempts"]) == (
        "fixable", "RetryAttemptsExhausted", 3)
    assert letter["event"] == {"records": [1, 2]}
    assert letter["errors"][0]["errorMessage"] == "bad batch"
    (tmp_path / "flag").write_text("fixed")
    assert flowrun("dlq", "redrive", "from-a-trigger", "-c", config).returncode == 0
    await eventually(lambda: out_lines(tmp_path) == ["from-a-trigger"])
