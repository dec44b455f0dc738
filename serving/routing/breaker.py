"""A circuit breaker per replica: closed, open, half-open, on an injected clock.

Only engine faults count (connection errors, 5xx, timeouts); the caller decides what a
fault is and never reports client errors or disconnects. ``breaker_failures`` faults in
a row open it; after ``open_s`` it lets ``probes`` requests through (half-open); one
success closes it, one failure opens it again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

State = Literal["closed", "open", "half_open"]


@dataclass
class CircuitBreaker:
    failures_to_open: int = 5
    open_s: float = 10.0
    probes: int = 1
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    state: State = "closed"
    failures: int = 0
    opened_at: float = 0.0
    probing: int = 0
    trips: int = 0  # times it opened (a metric)

    def available(self) -> bool:
        """Would a request be let through now? (No side effect.)"""
        if self.state == "closed":
            return True
        if self.state == "open":
            return self.clock() - self.opened_at >= self.open_s
        return self.probing < self.probes

    def allow(self) -> bool:
        """Let one request through, claiming a probe when half-open."""
        if self.state == "open" and self.clock() - self.opened_at >= self.open_s:
            self.state, self.probing = "half_open", 0
        if self.state == "closed":
            return True
        if self.state == "half_open" and self.probing < self.probes:
            self.probing += 1
            return True
        return False

    def forget(self) -> None:
        """A request it let through ended without a verdict (the client left)."""
        if self.state == "half_open" and self.probing:
            self.probing -= 1

    def record(self, fault: bool) -> None:
        """The outcome of a request that ``allow`` let through."""
        if not fault:
            self.state, self.failures, self.probing = "closed", 0, 0
            return
        self.failures += 1
        if self.state == "half_open" or self.failures >= self.failures_to_open:
            if self.state != "open":
                self.trips += 1
            self.state, self.opened_at, self.probing = "open", self.clock(), 0
