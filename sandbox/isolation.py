"""How a worker is confined beyond rlimits: the ``Limiter`` interface the pool calls.

A ``Limiter`` hands out one ``Placement`` per worker. The pool places the worker right after
it starts (before any user code runs), hands the worker its peak memory counter (which
the worker resets and reads around each invocation), asks after a worker's death for the
peak and for an out-of-memory kill, and releases it when the worker is gone.
``NoIsolation`` is the stand-in that enforces nothing beyond rlimits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol


class Placement(Protocol):
    def place(self, pid: int) -> None: ...

    def before_invoke(self) -> None:
        """Called before every invocation; must be cheap after the first."""
        ...

    def peak_counter(self) -> tuple[int, bytes] | None:
        """A descriptor on a resettable peak memory counter and the bytes that reset it, for
        the worker to inherit; None when the worker should measure its own peak RSS."""
        ...

    def peak_memory_mb(self) -> int | None:
        """Peak memory of the worker's cgroup since the worker last reset it; None when
        unknown."""
        ...

    def cpu_usage_ms(self) -> float | None:
        """CPU time of the worker's cgroup since it was made; None when unknown."""
        ...

    def oom_killed(self) -> bool: ...

    def kill_all(self) -> None:
        """Kill every process in the worker's cgroup (grandchildren that left the group)."""
        ...

    def release(self) -> None: ...


class Limiter(Protocol):
    def placement(self, function: str, worker_id: str, settings: Mapping[str, Any]) -> Placement: ...

    def rlimits(self, settings: Mapping[str, Any]) -> dict[str, int]: ...

    def command_prefix(self, settings: Mapping[str, Any]) -> Sequence[str]:
        """Argv to put before the worker command (e.g. a namespace helper); may be empty."""
        ...

    def worker_environment(self, settings: Mapping[str, Any]) -> dict[str, str]:
        """Variables the worker needs to enter its role (namespaces, scratch, user)."""
        ...

    def describe(self) -> dict[str, Any]:
        """Which limits are enforced and by what, for ``flowrun status``."""
        ...

    def describe_function(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        """One function's limits as enforced here (a line of ``flowrun status``)."""
        ...


class NullPlacement:
    def place(self, pid: int) -> None:
        pass

    def before_invoke(self) -> None:
        pass

    def peak_memory_mb(self) -> int | None:
        return None

    def cpu_usage_ms(self) -> float | None:
        return None

    def peak_counter(self) -> tuple[int, bytes] | None:
        return None

    def oom_killed(self) -> bool:
        return False

    def kill_all(self) -> None:
        pass

    def release(self) -> None:
        pass


class NoIsolation:
    """Only rlimits: open files, core dumps, file size."""

    def placement(self, function: str, worker_id: str, settings: Mapping[str, Any]) -> Placement:
        return NullPlacement()

    def rlimits(self, settings: Mapping[str, Any]) -> dict[str, int]:
        from sandbox.limits import rlimits

        return rlimits.defaults()

    def command_prefix(self, settings: Mapping[str, Any]) -> Sequence[str]:
        return ()

    def worker_environment(self, settings: Mapping[str, Any]) -> dict[str, str]:
        return {}

    def describe_function(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        return {}

    def describe(self) -> dict[str, Any]:
        return {
            "memory": "not enforced (no cgroup)",
            "cpu": "not enforced (no cgroup)",
            "pids": "not enforced",
            "nofile": "rlimit",
            "core": "rlimit",
            "fsize": "rlimit",
        }
