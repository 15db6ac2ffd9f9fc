"""Handlers for the MQTT trigger tests: each event lands as one JSON file in $OUT_DIR."""

import json
import os
import time
import uuid


def _write(event):
    folder = os.environ["OUT_DIR"]
    name = f"{time.time_ns()}-{uuid.uuid4().hex}.json"
    temp = os.path.join(folder, f".{name}.tmp")
    with open(temp, "w") as file:
        json.dump(event, file)
    os.replace(temp, os.path.join(folder, name))


def record(event, context):
    _write(event)
    return {"records": len(event["records"])}


def record_then_sleep(event, context):
    """Record, then sleep ``sleep_s`` from a first-time (not duplicate) record's payload."""
    _write(event)
    for item in event["records"]:
        payload = item["payload"]
        if not item["duplicate"] and isinstance(payload, dict) and "sleep_s" in payload:
            time.sleep(float(payload["sleep_s"]))
    return "ok"


def count(event, context):
    return len(event["records"])
