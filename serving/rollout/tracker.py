"""Per version: requests in flight (what a drain waits for) and a window of recent
outcomes (what a canary gate judges).

Fed by ``serving.observe.record.Observation``: ``enter`` when a request is resolved to a
version, ``leave`` exactly once when it ends. A request counts from its resolution, not
from its engine call, so a drain also waits for requests still queued or checking limits.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from models.types import VersionKey

# Refusals that say nothing about the version's own health.
NOT_THE_VERSIONS_FAULT = frozenset(
    {"rate_limits_unavailable", "auth_unavailable", "retrieval_unavailable"}
)


@dataclass(frozen=True)
class Sample:
    at: float  # when the request ended (tracker clock)
    ttft_s: float | None  # first content chunk of a stream, or the whole answer; None: failed
    error: bool  # the version failed it (5xx or a broken stream), not the client


def is_error(status: int, error_type: str | None) -> bool:
    if error_type in NOT_THE_VERSIONS_FAULT:
        return False
    return status >= 500 or (status == 200 and error_type is not None)


class VersionTracker:
    def __init__(self, keep: int = 20_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.keep = keep
        self.clock = clock
        self.inflight: Counter[VersionKey] = Counter()
        self._samples: dict[VersionKey, deque[Sample]] = {}

    def __repr__(self) -> str:
        inflight = {str(key): n for key, n in self.inflight.items()}
        return f"VersionTracker(inflight={inflight!r})"

    def enter(self, key: VersionKey) -> None:
        self.inflight[key] += 1

    def move(self, old: VersionKey, new: VersionKey) -> None:
        self.inflight[old] -= 1
        self.inflight[new] += 1

    def leave(self, key: VersionKey, ttft_s: float | None, error: bool) -> None:
        self.inflight[key] -= 1
        samples = self._samples.get(key)
        if samples is None:
            samples = self._samples[key] = deque(maxlen=self.keep)
        samples.append(Sample(self.clock(), ttft_s, error))

    def since(self, key: VersionKey, start: float) -> list[Sample]:
        return [s for s in self._samples.get(key, ()) if s.at >= start]

    async def drained(self, key: VersionKey, timeout_s: float, poll_s: float = 0.05) -> bool:
        """Wait until no request resolved to ``key`` is still running; False on timeout."""
        deadline = self.clock() + timeout_s
        while self.inflight[key] > 0:
            if self.clock() >= deadline:
                return False
            await asyncio.sleep(poll_s)
        return True
