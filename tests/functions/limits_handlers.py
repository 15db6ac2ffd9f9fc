"""Handlers that push against their limits: memory, pids, CPU, network, scratch, files."""

import errno
import os
import socket
import time

MIB = 1024 * 1024
HELD = []


def identity(event, context):
    return {"uid": os.getuid(), "gid": os.getgid(), "pid": os.getpid(),
            "tmpdir": os.environ.get("TMPDIR"), "environment": sorted(os.environ)}


def allocate(event, context):
    """Touch ``mb`` MB of fresh memory; ``keep`` holds it past the invocation."""
    block = bytearray(int(event["mb"]) * MIB)
    for offset in range(0, len(block), 4096):
        block[offset] = 1
    if event.get("keep"):
        HELD.append(block)
    return {"mb": event["mb"]}


def _error_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def fork_many(event, context):
    """Fork up to ``n`` children that wait on a pipe; report how many forks succeeded."""
    read_end, write_end = os.pipe()
    children, failure = [], None
    for _ in range(int(event["n"])):
        try:
            pid = os.fork()
        except OSError as exc:
            failure = _error_name(exc)
            break
        if pid == 0:
            os.close(write_end)
            os.read(read_end, 1)
            os._exit(0)
        children.append(pid)
    os.close(write_end)
    os.close(read_end)
    for pid in children:
        os.waitpid(pid, 0)
    return {"forked": len(children), "error": failure}


def spin(event, context):
    """Burn CPU for ``seconds`` of wall time."""
    end = time.monotonic() + float(event["seconds"])
    n = 0
    while time.monotonic() < end:
        n += 1
    return {"loops": n}


def _connect(port: int) -> str:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return "ok"
    except OSError as exc:
        return _error_name(exc) if exc.errno else type(exc).__name__


def connect(event, context):
    """Connect to ``port`` on 127.0.0.1, and to a listener of our own on 127.0.0.1."""
    own = "ok"
    try:
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen()
            own = _connect(server.getsockname()[1])
    except OSError as exc:
        own = _error_name(exc)
    outcome = {"daemon_port": _connect(int(event["port"])), "own_port": own}
    if event.get("outside"):  # an address beyond the box (TEST-NET-1: nothing answers)
        outcome["outside"] = _connect_to(event["outside"], 80)
    return outcome


def _connect_to(host: str, port: int) -> str:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return "ok"
    except OSError as exc:
        return _error_name(exc) if exc.errno else type(exc).__name__


def write_scratch(event, context):
    path = os.path.join(os.environ["TMPDIR"], "big")
    chunk = b"x" * MIB
    written = 0
    try:
        with open(path, "wb") as f:
            for _ in range(int(event["mb"])):
                f.write(chunk)
                f.flush()
                written += 1
        return {"written_mb": written, "error": None}
    except OSError as exc:
        return {"written_mb": written, "error": _error_name(exc)}
    finally:
        if os.path.exists(path):
            os.unlink(path)


def read_paths(event, context):
    """Try to list or read each path; report what happened."""
    outcome = {}
    for path in event["paths"]:
        try:
            if os.path.isdir(path):
                os.listdir(path)
            else:
                with open(path, "rb") as f:
                    f.read(1)
            outcome[path] = "ok"
        except OSError as exc:
            outcome[path] = _error_name(exc)
    return outcome
