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

from flowrun.batching import SlicedBuffer
from flowrun.types import InvocationResult

logger = logging.getLogger("flowrun.invocations")
RESULTS_PER_SLICE = 128  # a timed flush writes this many, then lets the loop run


def report_line(result: InvocationResult) -> str:
    line = (f"REPORT RequestId: {result.request_id}\tDuration: {result.duration_ms:.2f} ms\t"
            f"Billed Duration: {result.billed_duration_ms} ms\t"
            f"Memory Size: {result.memory_size_mb} MB\t"
            f"Max Memory Used: {result.max_memory_used_mb} MB")
    if result.init_duration_ms is not None:
        line += f"\tInit Duration: {result.init_duration_ms:.2f} ms"
    if result.status == "timeout":
        line += "\tStatus: timeout"
    elif result.status == "error" and result.error_type and result.error_type.startswith("Runtime."):
        line += f"\tStatus: error\tError Type: {result.error_type}"
    return line


def lines(result: InvocationResult, version: str = "$LATEST") -> str:
    """START, the handler's output, an error line if any, END and REPORT (one f-string in
    the common case: this runs for every invocation)."""
    request_id = result.request_id
    body = result.logs.rstrip("\n") + "\n" if result.logs else ""
    if result.status == "timeout":
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(result.started_at))
        body += f"{stamp}Z {request_id} {result.error_message}\n"
    elif result.status == "error" and result.error_type:
        body += f"[ERROR] {result.error_type}: {result.error_message}\n"
    return (f"START RequestId: {request_id} Version: {version}\n{body}"
            f"END RequestId: {request_id}\n{report_line(result)}\n")


class InvocationLog:
    """Buffered per-function log files."""

    def __init__(self, directory: Path, flush_interval_s: float = 0.05) -> None:
        self.directory = directory
        self._files: dict[str, IO[str]] = {}
        self._buffer: SlicedBuffer[InvocationResult] = SlicedBuffer(
            self._write, flush_interval_s, RESULTS_PER_SLICE)

    def path(self, function: str) -> Path:
        return self.directory / f"{function}.log"

    def write(self, result: InvocationResult) -> None:
        """Queue one invocation's lines; they are formatted and written within 50 ms."""
        self._buffer.add(result)

    def flush(self) -> None:
        """Format and write every queued result now."""
        self._buffer.flush()

    def _file(self, function: str) -> IO[str]:
        file = self._files.get(function)
        if file is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            file = self._files[function] = open(  # noqa: SIM115
                self.path(function), "a", encoding="utf-8")
        return file

    def _write(self, pending: list[InvocationResult]) -> None:
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
