"""Handlers the tests invoke in real worker processes."""

import json
import logging
import os
import sys
import time

CALLS = 0


def echo(event, context):
    return event


def noop(event, context):
    return None


def counter(event, context):
    """Module globals survive on a warm worker."""
    global CALLS
    CALLS += 1
    return {"calls": CALLS, "pid": os.getpid()}


def context_info(event, context):
    return {
        "aws_request_id": context.aws_request_id,
        "function_name": context.function_name,
        "function_version": context.function_version,
        "invoked_function_arn": context.invoked_function_arn,
        "memory_limit_in_mb": context.memory_limit_in_mb,
        "log_group_name": context.log_group_name,
        "log_stream_name": context.log_stream_name,
        "remaining_ms": context.get_remaining_time_in_millis(),
        "env": dict(os.environ),
        "attributes": sorted(vars(context)),
    }


def chatty(event, context):
    print("printed line")
    logging.getLogger().warning("logged line")
    print("to stderr", file=sys.stderr)
    return "ok"


def fail(event, context):
    raise ValueError("something went wrong")


def sleep(event, context):
    time.sleep(float((event or {}).get("seconds", 10)))
    return "slept"


def exit_interpreter(event, context):
    sys.exit(3)


def unserialisable(event, context):
    return {1, 2, 3}


def write_tmp(event, context):
    path = os.path.join(os.environ["TMPDIR"], "state.txt")
    before = open(path).read() if os.path.exists(path) else ""
    with open(path, "w") as f:
        f.write(before + "x")
    return {"before": before}


def allocate(event, context):
    """Touch ``mb`` megabytes, then return."""
    block = bytearray(int(event["mb"]) * 1024 * 1024)
    for i in range(0, len(block), 4096):
        block[i] = 1
    return len(block) // (1024 * 1024)


def json_round_trip(event, context):
    return json.loads(json.dumps(event))


def child_fds(event, context):
    """Descriptors a child started with close_fds=False inherits from the worker."""
    import subprocess

    listing = subprocess.run(["ls", "/proc/self/fd"], close_fds=False, capture_output=True,
                             text=True, check=True).stdout.split()
    return {"child": sorted(int(fd) for fd in listing), "worker": len(os.listdir("/proc/self/fd"))}


def corrupt_protocol(event, context):
    """Write a frame header claiming 2 GiB to every pipe this process holds, then linger."""
    import struct

    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("pipe:"):
                os.write(int(name), struct.pack(">I", 2**31))
        except OSError:
            pass
    time.sleep(10)
    return "unreachable"
