"""START / END / REPORT lines in Lambda's format, one set per invocation.

Each function's lines go to ``state_dir/logs/NAME.log`` (what ``flowrun logs`` reads) and to
the ``flowrun.invocations`` logger, which the CLI prints and an embedding app may route.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO

from flowrun.types import InvocationResult

logger = logging.getLogger("flowrun.invocations")


def report_line(result: InvocationResult) -> str:
    parts = [
        f"REPORT RequestId: {result.request_id}",
        f"Duration: {result.duration_ms:.2f} ms",
        f"Billed Duration: {result.billed_duration_ms} ms",
        f"Memory Size: {result.memory_size_mb} MB",
        f"Max Memory Used: {result.max_memory_used_mb} MB",
    ]
    if result.init_duration_ms is not None:
        parts.append(f"Init Duration: {result.init_duration_ms:.2f} ms")
    if result.status == "timeout":
        parts.append("Status: timeout")
    elif result.status == "error" and result.error_type and result.error_type.startswith("Runtime."):
        parts.append("Status: error")
        parts.append(f"Error Type: {result.error_type}")
    return "\t".join(parts)


def lines(result: InvocationResult, version: str = "$LATEST") -> str:
    out = [f"START RequestId: {result.request_id} Version: {version}"]
    if result.logs:
        out.append(result.logs.rstrip("\n"))
    if result.status == "timeout":
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(result.started_at))
        out.append(f"{stamp}Z {result.request_id} {result.error_message}")
    elif result.status == "error" and result.error_type:
        out.append(f"[ERROR] {result.error_type}: {result.error_message}")
    out.append(f"END RequestId: {result.request_id}")
    out.append(report_line(result))
    return "\n".join(out) + "\n"


class InvocationLog:
    """Buffered per-function log files."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._files: dict[str, IO[str]] = {}
        self._pending: list[InvocationResult] = []
        self._timer: asyncio.TimerHandle | None = None

    def path(self, function: str) -> Path:
        return self.directory / f"{function}.log"

    def write(self, result: InvocationResult) -> None:
        """Queue one invocation's lines; they are formatted and written within 50 ms."""
        self._pending.append(result)
        if self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(0.05, self.flush)
            except RuntimeError:
                self.flush()

    def _file(self, function: str) -> IO[str]:
        file = self._files.get(function)
        if file is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            file = self._files[function] = open(  # noqa: SIM115
                self.path(function), "a", encoding="utf-8")
        return file

    def flush(self) -> None:
        self._timer = None
        pending, self._pending = self._pending, []
        to_logger = logger.isEnabledFor(logging.INFO)
        dirty = set()
        for result in pending:
            text = lines(result)
            self._file(result.function).write(text)
            dirty.add(result.function)
            if to_logger:
                logger.info("%s", text.rstrip("\n"), extra={"function": result.function})
        for name in dirty:
            self._files[name].flush()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.flush()
        for file in self._files.values():
            file.close()
        self._files.clear()


async def follow(path: Path, poll_s: float = 0.2, from_start: bool = True) -> AsyncIterator[str]:
    """Yield lines of ``path`` as they are appended (``tail -f``), waiting for the file."""
    while not path.exists():
        await asyncio.sleep(poll_s)
    with open(path, encoding="utf-8") as file:
        if not from_start:
            file.seek(0, 2)
        partial = ""
        while True:
            chunk = file.readline()
            if not chunk:
                await asyncio.sleep(poll_s)
                continue
            partial += chunk
            if partial.endswith("\n"):
                yield partial.rstrip("\n")
                partial = ""
