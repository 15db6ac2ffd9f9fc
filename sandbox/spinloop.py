"""Keep the daemon's event loop polling, not sleeping, while a quick reply is due.

On virtual machines waking a process that sleeps on an idle CPU costs tens to hundreds of
microseconds (a bare pipe ping-pong here: 100 µs blocking, 16 µs when the other side
polls), which would dominate a warm invocation's round trip. After a request is sent to a
worker, ``LoopSpinner`` schedules a callback that re-schedules itself while requests are in
flight and the spin window (``LOOP_SPIN_US`` after the latest request) is open: with a
callback always ready the loop polls its descriptors with a zero timeout each iteration
instead of blocking, so the worker's reply is read the moment it lands. When the window
closes (a slow handler) the loop sleeps as usual.

It is a callback, not a selector: it works on any event loop (asyncio's own, uvloop, an
embedding application's) and needs nothing from the caller. The CPU it costs is the
daemon's, at most ``LOOP_SPIN_US`` a request, whatever the function's own ``spin_us``
(which is the worker's polling for its next request, paid from the function's CPU share).
"""

from __future__ import annotations

import asyncio
import time

LOOP_SPIN_US = 200


class LoopSpinner:
    """One per event loop (the worker pool holds it)."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.until = 0.0
        self.running = False
        self.spins = 0  # callbacks run, for tests and curiosity
        self._loop: asyncio.AbstractEventLoop | None = None

    def sent(self, window_us: int = LOOP_SPIN_US) -> None:
        """A request went out; poll for up to ``window_us`` for its reply (0: do not)."""
        self.in_flight += 1
        if window_us <= 0:
            return
        until = time.perf_counter() + window_us / 1e6
        if until > self.until:
            self.until = until
        if not self.running:
            self.running = True
            self._loop = asyncio.get_running_loop()
            self._loop.call_soon(self._tick)

    def answered(self) -> None:
        self.in_flight -= 1

    def _tick(self) -> None:
        self.spins += 1
        if self.in_flight and time.perf_counter() < self.until:
            assert self._loop is not None
            self._loop.call_soon(self._tick)
        else:
            self.running = False
