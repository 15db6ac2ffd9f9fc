"""POSIX rlimits, applied by the worker to itself before it imports any user code.

The pool passes them as JSON in ``FLOWRUN_LIMITS`` (a map of resource name to soft/hard
value); a limit the process may not raise is lowered as far as it can go instead.
"""

from __future__ import annotations

import json
import resource
from collections.abc import Mapping

NOFILE = 1024  # as on Lambda
FSIZE_BYTES = 1024 * 1024 * 1024

NAMES = {
    "nofile": resource.RLIMIT_NOFILE,
    "core": resource.RLIMIT_CORE,
    "fsize": resource.RLIMIT_FSIZE,
    "nproc": resource.RLIMIT_NPROC,
    "as": resource.RLIMIT_AS,
}


def defaults(fsize_bytes: int = FSIZE_BYTES) -> dict[str, int]:
    """The rlimits every worker gets."""
    return {"nofile": NOFILE, "core": 0, "fsize": fsize_bytes}


def encode(limits: Mapping[str, int]) -> str:
    return json.dumps(dict(limits))


def apply(limits: Mapping[str, int]) -> None:
    for name, value in limits.items():
        res = NAMES[name]
        _soft, hard = resource.getrlimit(res)
        if hard != resource.RLIM_INFINITY and value > hard:
            value = hard
        resource.setrlimit(res, (value, value))


def apply_from_env(environ: Mapping[str, str]) -> None:
    raw = environ.get("FLOWRUN_LIMITS")
    if raw:
        apply(json.loads(raw))
