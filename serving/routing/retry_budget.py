"""A retry budget: retries may be at most ``ratio`` of the requests in a sliding window.

Counts go in one-second buckets over ``window_s``; ``floor`` retries per window are
always allowed so a quiet gateway can still retry. One method to ask (``spend``), one
to count (``record_request``), an injected clock.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class RetryBudget:
    ratio: float = 0.1
    window_s: float = 10.0
    floor: int = 10
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    _buckets: deque[list[int]] = field(default_factory=deque, repr=False)  # [second, req, retry]

    def record_request(self) -> None:
        self._bucket()[1] += 1

    def spend(self) -> bool:
        """Take one retry from the budget if there is one left."""
        bucket = self._bucket()
        requests = sum(b[1] for b in self._buckets)
        retries = sum(b[2] for b in self._buckets)
        if retries >= max(self.floor, math.floor(requests * self.ratio)):
            return False
        bucket[2] += 1
        return True

    def _bucket(self) -> list[int]:
        second = int(self.clock())
        while self._buckets and self._buckets[0][0] <= second - self.window_s:
            self._buckets.popleft()
        if not self._buckets or self._buckets[-1][0] != second:
            self._buckets.append([second, 0, 0])
        return self._buckets[-1]
