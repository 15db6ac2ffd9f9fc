"""An optional event loop that polls briefly before sleeping while workers are busy.

On virtual machines waking an idle CPU costs tens to hundreds of microseconds, which
dominates a warm invocation's round trip. ``new_event_loop()`` returns a selector loop whose
``select`` polls for up to ``spin_us`` before blocking, but only while some worker holds an
outstanding request (so an idle daemon does not spin). ``flowrun run`` uses it; embedders can
opt in with ``asyncio.set_event_loop(new_event_loop())`` or ``Runner(loop_factory=...)``.
"""

from __future__ import annotations

import asyncio
import selectors
import time
from typing import Any

from sandbox import pool

DEFAULT_SPIN_US = 200


class SpinningSelector(selectors.DefaultSelector):
    def __init__(self, spin_us: int = DEFAULT_SPIN_US) -> None:
        super().__init__()
        self.spin_s = spin_us / 1e6

    def select(self, timeout: float | None = None) -> list[tuple[Any, int]]:
        if self.spin_s and pool.in_flight() and (timeout is None or timeout > 0):
            spin = self.spin_s if timeout is None else min(self.spin_s, timeout)
            end = time.perf_counter() + spin
            while True:
                ready: list[tuple[Any, int]] = super().select(0)
                if ready:
                    return ready
                if time.perf_counter() >= end:
                    break
            if timeout is not None:
                timeout = max(0.0, timeout - spin)
        result: list[tuple[Any, int]] = super().select(timeout)
        return result


def new_event_loop(spin_us: int = DEFAULT_SPIN_US) -> asyncio.AbstractEventLoop:
    return asyncio.SelectorEventLoop(SpinningSelector(spin_us))
