"""api/wake.py: the API wakes the dispatcher at most once per interval, and always after the
last submit of a burst."""

from __future__ import annotations

import asyncio
import time

import pytest

from api.wake import WakeCoalescer

pytestmark = pytest.mark.timeout(30)


def test_a_burst_of_submits_sends_one_wake_now_and_one_after_it():
    async def burst():
        sent: list[float] = []
        trailing = asyncio.Event()

        def send():
            sent.append(time.monotonic())
            if len(sent) == 2:
                trailing.set()

        wake = WakeCoalescer(send, interval=0.2)
        wake()  # the first submit wakes the dispatcher at once
        assert len(sent) == 1
        for _ in range(50):  # the rest of the burst, within the interval
            wake()
        last_call = time.monotonic()
        assert len(sent) == 1
        await asyncio.wait_for(trailing.wait(), timeout=5)
        # Nothing else is due: no timer is left that could send a third wake-up (checked on
        # the coalescer's state, not by waiting a while and seeing none come).
        assert wake._pending is None
        assert not [h for h in asyncio.get_running_loop()._scheduled if not h.cancelled()]
        return sent, last_call

    sent, last_call = asyncio.run(burst())
    assert len(sent) == 2
    assert sent[1] >= last_call and sent[1] - sent[0] >= 0.2 - 0.01


def test_submits_further_apart_than_the_interval_each_wake_at_once():
    async def spaced():
        sent = []
        wake = WakeCoalescer(lambda: sent.append(1), interval=0.05)
        for i in range(3):
            wake()
            assert len(sent) == i + 1  # sent now, not deferred
            await asyncio.sleep(0.08)
        return sent

    assert len(asyncio.run(spaced())) == 3
