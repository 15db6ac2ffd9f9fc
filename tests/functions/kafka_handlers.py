"""Handlers the Kafka trigger tests invoke: they log what they saw to a file."""

import base64
import json
import os
import time


def _records(event):
    for records in event["records"].values():
        yield from records


def _log(event, path=None):
    """Append one line per record, ``partition offset``, in a single write."""
    lines = "".join(f"{r['partition']} {r['offset']}\n" for r in _records(event))
    fd = os.open(path or os.environ["OFFSETS_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, lines.encode())
    finally:
        os.close(fd)


def record_offsets(event, context):
    """Log every record; sleep ``SLEEP_S`` per batch when set."""
    _log(event)
    delay_s = float(os.environ.get("SLEEP_S", "0"))
    if delay_s:
        time.sleep(delay_s)
    return {"records": sum(1 for _ in _records(event))}


def count(event, context):
    """The benchmark's batch function: decode every value, return how many there were."""
    return {"records": sum(len(base64.b64decode(r["value"])) >= 0 for r in _records(event))}


def poison(event, context):
    """Fail the whole batch when it holds a record whose value is ``poison``."""
    _log(event)
    for record in _records(event):
        if base64.b64decode(record["value"]) == b"poison":
            raise ValueError(f"poison record at offset {record['offset']}")
    return None


def partial(event, context):
    """Report records whose value is ``bad`` as failed the first time they are seen."""
    with open(os.environ["BATCHES_FILE"], "a") as file:
        file.write(json.dumps([r["offset"] for r in _records(event)]) + "\n")
    failures = []
    for record in _records(event):
        marker = os.path.join(os.environ["TMPDIR"], f"seen-{record['offset']}")
        if base64.b64decode(record["value"]) == b"bad" and not os.path.exists(marker):
            open(marker, "w").close()
            failures.append({"itemIdentifier": str(record["offset"])})
    return {"batchItemFailures": failures}


def describe(event, context):
    """Return the event's shape for the event-format test."""
    with open(os.environ["EVENTS_FILE"], "a") as file:
        file.write(json.dumps(event) + "\n")
    return None


def shout(event, context):
    """Upper-case every value; fail the batch on ``poison``."""
    values = [base64.b64decode(r["value"]).decode() for r in _records(event)]
    if "poison" in values:
        raise ValueError("poison")
    return {"values": [v.upper() for v in values]}
