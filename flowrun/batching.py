"""Buffered writing off the invocation's path, in slices that let the event loop run.

``SlicedBuffer`` collects items (ledger rows, log results) and hands them to its ``write``
function ``interval_s`` after the first one arrives, at most ``slice_size`` at a time: the
next slice waits until whatever else the loop has ready has run, so invocations in flight
are not held up for a whole batch. Without a running loop every item is written at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class SlicedBuffer(Generic[T]):
    def __init__(self, write: Callable[[list[T]], None], interval_s: float,
                 slice_size: int) -> None:
        self.write = write
        self.interval_s = interval_s
        self.slice_size = slice_size
        self.pending: list[T] = []
        self._timer: asyncio.Handle | None = None

    def add(self, item: T) -> None:
        self.pending.append(item)
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._timer = loop.call_later(self.interval_s, self._write_slice)

    def _write_slice(self) -> None:
        self._timer = None
        items = self.pending[: self.slice_size]
        del self.pending[: self.slice_size]
        if self.pending:
            self._timer = asyncio.get_running_loop().call_soon(self._write_slice)
        self.write(items)

    def flush(self) -> None:
        """Write everything buffered, now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        items, self.pending = self.pending, []
        if items:
            self.write(items)
