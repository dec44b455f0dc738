"""One-minute limit windows that do not roll over under a test.

Token and request limits count per wall-clock minute. A test that sends a few requests
and reads ``x-ratelimit-remaining-*`` fails when a minute ends between two of them. An
in-process store gets a clock the test holds (its windows never roll); a Redis store
(Redis TIME) is waited on until enough of its minute is left.
"""

from __future__ import annotations

import time
from typing import Any

from serving.limits.store import MemoryLimitStore

WINDOW_START = 960_000.0  # a minute boundary (16,000 minutes)


class Clock:
    def __init__(self, now: float = WINDOW_START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def hold_limit_window(app: Any) -> Clock:
    """The gateway's in-process limit stores read a clock the test holds from now on."""
    limiter = app.state.limiter
    assert isinstance(limiter.store, MemoryLimitStore), limiter.store
    clock = Clock()
    limiter.store.clock = clock
    limiter.fallback.clock = clock
    return clock


def wait_for_fresh_window(seconds_needed: float) -> None:
    """Sleep into the next minute when fewer than ``seconds_needed`` are left of this one
    (for Redis-backed limits, whose windows follow the wall clock)."""
    assert seconds_needed < 50
    left = 60 - time.time() % 60
    if left < seconds_needed:
        time.sleep(left + 0.05)
