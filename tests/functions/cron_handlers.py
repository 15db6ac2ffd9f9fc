"""Handlers for the cron trigger tests."""

import json
import os
import time


def record(event, context):
    """Append the event as one JSON line to $RECORD_FILE."""
    with open(os.environ["RECORD_FILE"], "a") as f:
        f.write(json.dumps(event) + "\n")
    return {"ok": True}


def record_slowly(event, context):
    """Record the event, then take $SLOW_S seconds."""
    record(event, context)
    time.sleep(float(os.environ.get("SLOW_S", "1")))
    return {"ok": True}
