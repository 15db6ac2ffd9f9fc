"""Handlers for the dispatcher, CLI and daemon tests."""

import os
import time


def sleep_then_pid(event, context):
    """Sleep ``seconds`` (default 1), then say who ran and for how long."""
    started = time.monotonic()
    time.sleep(float((event or {}).get("seconds", 1)))
    return {"pid": os.getpid(), "slept_s": round(time.monotonic() - started, 3),
            "request_id": context.aws_request_id}


def greet(event, context):
    print(f"greeting {event.get('name', 'nobody')}")
    return {"greeting": f"hello {event.get('name', 'nobody')}"}


def fail(event, context):
    raise RuntimeError(f"no luck with {event!r}")
