"""Back-off strategies: one method, ``compute(failures) -> seconds`` (after redis-py).

Two users: the supervisor waits this long before restarting an engine that keeps
exiting, and ``serving.routing.dispatch`` before retrying on another replica. It lives
here, below both, because ``models`` never imports ``serving``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Protocol


class Backoff(Protocol):
    def compute(self, failures: int) -> float: ...


@dataclass(frozen=True)
class ExponentialBackoff:
    """``base * 2**(failures-1)``, capped; ``jitter`` draws uniformly from [0, that]."""

    base: float = 1.0
    cap: float = 30.0
    jitter: bool = False
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def compute(self, failures: int) -> float:
        if failures <= 0:
            return 0.0
        delay = min(self.cap, self.base * 2 ** min(failures - 1, 32))
        return self.rng.uniform(0.0, delay) if self.jitter else delay
