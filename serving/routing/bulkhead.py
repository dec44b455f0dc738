"""A bulkhead per served version: bounded in-flight requests, a bounded queue, a wait limit.

``acquire`` returns at once with a slot, waits in line (at most ``max_queue`` others,
at most ``timeout_s``), or raises ``EngineOverloaded`` at once when the line is full.
Memory stays bounded whatever the offered load: nothing beyond the line is held.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass, field

from models.errors import EngineOverloaded


@dataclass
class Bulkhead:
    name: str
    max_in_flight: int
    max_queue: int
    timeout_s: float
    in_flight: int = 0
    rejected: int = 0
    _waiters: deque[asyncio.Future[None]] = field(default_factory=deque, repr=False)

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def full(self) -> bool:
        """Would a request be refused at once?"""
        return self.in_flight >= self.max_in_flight and len(self._waiters) >= self.max_queue

    async def acquire(self) -> Slot:
        if self.in_flight < self.max_in_flight and not self._waiters:
            self.in_flight += 1
            return Slot(self)
        if len(self._waiters) >= self.max_queue:
            self.rejected += 1
            raise EngineOverloaded(
                f"{self.name} is at capacity ({self.max_in_flight} in flight,"
                f" {self.max_queue} waiting); retry shortly.",
                engine=self.name,
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.timeout_s)
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():
                return Slot(self)  # handed a slot just as the wait ran out: keep it
            waiter.cancel()
            self._forget(waiter)
            self.rejected += 1
            raise EngineOverloaded(
                f"{self.name} is at capacity: no slot within {self.timeout_s:g}s; retry shortly.",
                engine=self.name,
            ) from None
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # the slot we were handed goes to the next in line
            else:
                waiter.cancel()
                self._forget(waiter)
            raise
        return Slot(self)

    def _forget(self, waiter: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes straight to the next in line
                return
        self.in_flight -= 1


class Slot:
    """One held place in a bulkhead; ``release`` is idempotent."""

    __slots__ = ("_bulkhead",)

    def __init__(self, bulkhead: Bulkhead) -> None:
        self._bulkhead: Bulkhead | None = bulkhead

    def release(self) -> None:
        if self._bulkhead is not None:
            self._bulkhead._release()
            self._bulkhead = None
