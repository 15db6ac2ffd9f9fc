"""Handlers for the file trigger tests: each appends what it received to $FILE_LOG."""

import json
import os
import time


def _append(event, **extra):
    record = event["Records"][0]
    obj = record["s3"]["object"]
    line = {
        "eventName": record["eventName"],
        "key": obj["key"],
        "size": obj.get("size"),
        "eTag": obj.get("eTag"),
        "path": record["flowrun"]["path"],
        "invoked_at": time.time(),
        "event": event,
        **extra,
    }
    with open(os.environ["FILE_LOG"], "a") as f:
        f.write(json.dumps(line) + "\n")


def record(event, context):
    _append(event)
    return "ok"


def count_lines(event, context):
    """Read the file the event names, as a real handler would."""
    with open(event["Records"][0]["flowrun"]["path"], "rb") as f:
        lines = f.read().count(b"\n")
    _append(event, lines=lines)
    return {"lines": lines}


def fail(event, context):
    _append(event)
    raise RuntimeError("cannot handle " + event["Records"][0]["s3"]["object"]["key"])


def fail_first_time(event, context):
    """Fails the first invocation for each key, succeeds after (a marker file per key)."""
    key = event["Records"][0]["s3"]["object"]["key"]
    marker = os.path.join(os.environ["TMPDIR"], "failed-" + key.replace("/", "_"))
    if not os.path.exists(marker):
        open(marker, "w").close()
        raise RuntimeError("first attempt fails")
    _append(event)
    return "ok"


def slow_record(event, context):
    """Notes its start in $STARTS, sleeps $SLOW_S, then records."""
    with open(os.environ["STARTS"], "a") as f:
        f.write(event["Records"][0]["s3"]["object"]["key"] + "\n")
    time.sleep(float(os.environ.get("SLOW_S", "0")))
    _append(event)
    return "ok"
