"""Handlers for the durable-queue tests: they leave traces in files the tests read."""

import json
import os
import time


def _append(path, line):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def record(event, context):
    """Append the request id to $OUT_FILE (one write with O_APPEND: lines never interleave)."""
    _append(os.environ["OUT_FILE"], context.aws_request_id)
    return None


def fail_twice(event, context):
    """Fail the first two attempts of each request id, succeed on the third."""
    path = os.environ["OUT_FILE"]
    _append(path, context.aws_request_id)
    with open(path) as f:
        attempts = sum(1 for line in f if line.strip() == context.aws_request_id)
    if attempts < 3:
        raise RuntimeError(f"attempt {attempts} fails")
    return {"attempts": attempts}


def needs_flag(event, context):
    """Fail until the file $FLAG_FILE exists (the "fix" a redrive waits for)."""
    _append(os.environ["OUT_FILE"], context.aws_request_id)
    if not os.path.exists(os.environ["FLAG_FILE"]):
        raise ValueError("the flag file is missing")
    return "fixed"


def _source_text(event):
    """The text of the file an S3-style event names, or ``event["text"]``."""
    if isinstance(event, dict) and event.get("Records"):
        record = event["Records"][0]
        for key in ("flowrun", "local"):
            extra = record.get(key)
            if isinstance(extra, dict) and extra.get("path"):
                with open(extra["path"]) as f:
                    return f.read()
        with open(os.path.join(os.environ["INBOX"], record["s3"]["object"]["key"])) as f:
            return f.read()
    return event["text"]


def split_words(event, context):
    """Pipeline step 1: a text (or a dropped file) in, its words out."""
    return {"words": _source_text(event).split()}


def _write(name, value):
    out = os.environ["OUT_DIR"]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, name + ".tmp"), "w") as f:
        json.dump(value, f)
    os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))


def count_words(event, context):
    """Pipeline step 2a: count what step 1 produced."""
    words = event["responsePayload"]["words"]
    return {"count": len(words), "request": event["requestContext"]["requestId"]}


def upper_words(event, context):
    """Pipeline step 2b (fan-out): the same words in capitals."""
    _write("upper.json", [w.upper() for w in event["responsePayload"]["words"]])
    return None


def save_count(event, context):
    """Pipeline step 3: write step 2a's result."""
    _write("count.json", event["responsePayload"])
    return None


def record_slowly(event, context):
    """Sleep ``event["seconds"]``, then append the request id to $OUT_FILE."""
    time.sleep(float(event.get("seconds", 0.2)))
    _append(os.environ["OUT_FILE"], context.aws_request_id)
    return None
