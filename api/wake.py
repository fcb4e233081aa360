"""Waking the dispatcher after submits, at most once per interval.

Each submit used to send its own wake-up (a Serve handle call), and each wake-up made the
dispatcher try a claim for every family with room: under a burst of submits the API spent its
time on handle calls and the dispatcher on claims that found the work the previous one had
already taken. One wake-up per interval starts the same work; the last submit of a burst is
always followed by one, so nothing waits for the dispatcher's poll.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

WAKE_INTERVAL_SECONDS = 0.02


class WakeCoalescer:
    """`__call__` (on the event loop) sends `send()` now, or, within `interval` of the last
    one, once at the end of that interval however many calls came in between."""

    def __init__(self, send: Callable[[], None], interval: float = WAKE_INTERVAL_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        self._send, self._interval, self._clock = send, interval, clock
        self._last = float("-inf")
        self._pending: asyncio.TimerHandle | None = None

    def __call__(self) -> None:
        if self._pending is not None:
            return  # a wake-up is already due; it covers this submit too
        wait = self._last + self._interval - self._clock()
        if wait <= 0:
            self._fire()
        else:
            self._pending = asyncio.get_running_loop().call_later(wait, self._fire)

    def _fire(self) -> None:
        self._pending = None
        self._last = self._clock()
        self._send()
