"""A bulkhead per served version: bounded in-flight requests, a fair bounded queue.

``acquire(share)`` returns at once with a slot, waits in line (at most ``max_queue`` in
all, ``max_tenant_queue`` of one tenant, at most ``timeout_s``), or raises
``EngineOverloaded`` (503 with ``Retry-After``) at once when the line is full. Memory
stays bounded whatever the offered load: nothing beyond the line is held.

Fair (``fair=True``), the line is not first come, first served:

- **Priorities.** Interactive requests go before batch requests, always; a batch request
  takes a slot only when the interactive demand of the last ``window_s`` leaves room.
- **Weighted fair queueing across tenants** (start-time fair queueing, unit cost): each
  tenant's requests are tagged ``max(V, its last tag) + 1/weight`` and the lowest tag
  among the tenants that may go is served next, so under contention each tenant gets
  slots in proportion to its weight, and a tenant alone gets them all.
- **Reserved headroom.** A tenant seen in the last ``window_s`` keeps free
  ``min(its weighted share of the limit, its peak interactive demand + 1)`` slots it is not
  using, so that a light tenant's next request finds a slot at once instead of waiting
  behind a flooder's; a slot is handed over only if it leaves every *other* tenant's
  reservation free. When the line is full the newest waiter of the tenant queueing the
  most (batch ones first) is the one refused: a tenant's own share is what runs out.
- **Adaptive limit** (``adaptive=True``): the in-flight limit moves between
  ``min_in_flight`` and ``max_in_flight`` with the time to first token the gateway
  measures (``sample``): cut by 10% when it rises past ``tolerance`` times the recent best
  (the engine has started queueing: vLLM's own line is first come, first served), grown by
  ``1/limit`` per sample while the limit is what holds requests back. The fairness
  decision then happens here, not in the engine's queue.

Unfair (``fair=False``), every request is one tenant's and the line is FCFS (the gateway
as it was, kept for comparison and for ``routing.fair_queueing = false``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from models.errors import EngineOverloaded

Priority = Literal["interactive", "batch"]
PRIORITIES: tuple[Priority, ...] = ("interactive", "batch")
QueueObserver = Callable[[str, str, int], None]  # (priority, tenant label, queued now)


@dataclass(frozen=True, slots=True)
class Share:
    """Who asks for a slot: a tenant (fairness is between tenants), its weight, the
    request's priority, and the tenant's metric label (bounded: a key's name or team)."""

    tenant: str = "-"
    weight: float = 1.0
    priority: Priority = "interactive"
    label: str = "-"


ANYONE = Share()


class _Tenant:
    __slots__ = (
        "in_flight", "interactive", "label", "name", "peak", "queues", "seen", "tags", "weight",
    )  # fmt: skip

    def __init__(self, name: str, label: str) -> None:
        self.name = name
        self.label = label
        self.weight = 1.0
        self.in_flight = 0  # its slots held, both priorities
        self.interactive = 0  # its interactive slots held
        self.queues: dict[Priority, deque[_Waiter]] = {p: deque() for p in PRIORITIES}
        self.tags: dict[Priority, float] = dict.fromkeys(PRIORITIES, 0.0)
        self.peak = [0, 0]  # interactive demand peak: this window, the one before
        self.seen = -math.inf  # when it last asked for an interactive slot

    def demand(self) -> int:
        return max(self.peak)

    def idle(self) -> bool:
        return not self.in_flight and not any(self.queues.values())


@dataclass(eq=False, slots=True)
class _Waiter:
    future: asyncio.Future[None]
    tenant: _Tenant
    share: Share
    tag: float


@dataclass
class Bulkhead:
    name: str
    max_in_flight: int
    max_queue: int
    timeout_s: float
    fair: bool = True
    max_tenant_queue: int = 0  # 0: max_queue
    window_s: float = 5.0  # how long a tenant's demand is remembered
    adaptive: bool = False
    min_in_flight: int = 1
    tolerance: float = 1.5  # TTFT past this times the recent best: the engine is queueing
    min_excess_s: float = 0.025  # ... and past it by at least this much
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    observer: QueueObserver | None = field(default=None, repr=False)
    in_flight: int = 0
    rejected: int = 0
    limit: float = field(default=0.0)  # the in-flight limit now (adaptive), max_in_flight else
    _tenants: dict[str, _Tenant] = field(default_factory=dict, repr=False)
    _queued: int = field(default=0, repr=False)
    _vtime: dict[Priority, float] = field(default_factory=lambda: dict.fromkeys(PRIORITIES, 0.0))
    _window: int = field(default=0, repr=False)
    _best: list[float] = field(default_factory=lambda: [math.inf, math.inf], repr=False)
    _best_window: int = field(default=0, repr=False)
    _last_cut: float = field(default=-math.inf, repr=False)
    _timer: asyncio.TimerHandle | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.limit = float(self.max_in_flight)
        self.min_in_flight = max(1, min(self.min_in_flight, self.max_in_flight))

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def tenant_queue(self) -> int:
        return self.max_tenant_queue or self.max_queue

    def full(self) -> bool:
        """Would a request be refused at once?"""
        return self.in_flight >= self._cap() and self._queued >= self.max_queue

    def queued_by(self) -> dict[tuple[Priority, str], int]:
        """Waiting requests per (priority, tenant label)."""
        counts: dict[tuple[Priority, str], int] = {}
        for tenant in self._tenants.values():
            for priority, line in tenant.queues.items():
                if line:
                    key = (priority, tenant.label)
                    counts[key] = counts.get(key, 0) + len(line)
        return counts

    async def acquire(self, share: Share = ANYONE) -> Slot:
        if not self.fair:
            share = ANYONE
        now = self.clock()
        self._roll(now)
        tenant = self._tenants.get(share.tenant)
        if tenant is None:
            tenant = self._tenants[share.tenant] = _Tenant(share.tenant, share.label)
        tenant.weight = max(share.weight, 1e-6)
        priority = share.priority
        line = tenant.queues[priority]
        start = max(self._vtime[priority], tenant.tags[priority])
        tenant.tags[priority] = start + 1.0 / tenant.weight
        if priority == "interactive":
            tenant.seen = now
        if not self._queued and self._may_go_now(tenant, priority, now):
            # nobody waits and a slot is free for it: what _dispatch would do, at once
            self._vtime[priority] = start
            self._take(tenant, priority)
            return Slot(self, tenant, priority)
        waiter = _Waiter(asyncio.get_running_loop().create_future(), tenant, share, start)
        line.append(waiter)
        self._queued += 1
        if priority == "interactive":
            self._note_demand(tenant)
        self._dispatch()
        if waiter.future.done():
            return Slot(self, tenant, priority)
        refused = self._bound(waiter)
        if refused is waiter:
            raise self._overloaded(
                f"{self.name} is at capacity ({self.in_flight} in flight,"
                f" {self._queued} waiting); retry shortly."
            )
        self._observe(tenant, priority)
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), self.timeout_s)
        except TimeoutError:
            if _handed(waiter.future):
                return Slot(self, tenant, priority)  # handed a slot just as the wait ran out
            self._leave(waiter)
            raise self._overloaded(
                f"{self.name} is at capacity: no slot within {self.timeout_s:g}s; retry shortly."
            ) from None
        except asyncio.CancelledError:
            if _handed(waiter.future):
                self._release(tenant, priority)  # the slot we were handed goes on
            else:
                self._leave(waiter)
            raise
        return Slot(self, tenant, priority)

    def sample(self, ttft_s: float) -> None:
        """A time to first token measured on this version (adaptive limit)."""
        if not self.adaptive:
            return
        now = self.clock()
        window = int(now // 30.0)  # the recent best: this 30 s window's or the last's
        if window != self._best_window:
            shift = window - self._best_window
            self._best = [math.inf, self._best[0] if shift == 1 else math.inf]
            self._best_window = window
        self._best[0] = min(self._best[0], ttft_s)
        best = min(self._best)
        if ttft_s > best * self.tolerance and ttft_s - best > self.min_excess_s:
            if now - self._last_cut >= ttft_s:  # what queued before the cut drains first
                self._last_cut = now
                self.limit = max(float(self.min_in_flight), self.limit * 0.9)
        elif self.in_flight >= int(self.limit) - 1 or self._queued:
            self.limit = min(float(self.max_in_flight), self.limit + 1.0 / self.limit)
            self._dispatch()

    # -- internals ------------------------------------------------------------------

    def _cap(self) -> int:
        return max(1, int(self.limit))

    def _roll(self, now: float) -> None:
        window = int(now // self.window_s)
        if window == self._window:
            return
        shift = window - self._window
        self._window = window
        for name, tenant in list(self._tenants.items()):
            tenant.peak = [0, tenant.peak[0] if shift == 1 else 0]
            self._note_demand(tenant)
            if tenant.idle() and now - tenant.seen > 2 * self.window_s:
                del self._tenants[name]  # forgotten: it has nothing held or waiting

    def _note_demand(self, tenant: _Tenant) -> None:
        tenant.peak[0] = max(tenant.peak[0], tenant.interactive + len(tenant.queues["interactive"]))

    def _reserved(self, now: float) -> dict[str, int]:
        """Free slots kept for each tenant seen lately (by name; only those keeping any)."""
        if not self.fair:
            return {}
        active = [
            t
            for t in self._tenants.values()
            if t.interactive or t.queues["interactive"] or now - t.seen <= self.window_s
        ]
        if not active:
            return {}
        total = sum(t.weight for t in active)
        cap = self._cap()
        kept: dict[str, int] = {}
        for tenant in active:
            share = cap * tenant.weight / total
            want = min(share, tenant.demand() + 1) - tenant.interactive
            if want >= 1:
                kept[tenant.name] = int(want)
        return kept

    def _dispatch(self) -> None:
        """Hand free slots to the waiters who may have them, best first."""
        while self._queued and self.in_flight < self._cap():
            chosen = self._next()
            if chosen is None:
                return
            line = chosen.tenant.queues[chosen.share.priority]
            line.popleft()
            self._queued -= 1
            self._vtime[chosen.share.priority] = chosen.tag
            self._take(chosen.tenant, chosen.share.priority)
            chosen.future.set_result(None)
            self._observe(chosen.tenant, chosen.share.priority)

    def _may_go_now(self, tenant: _Tenant, priority: Priority, now: float) -> bool:
        """With nobody waiting: may ``tenant`` take a slot at ``priority`` now (as
        ``_next`` would choose it were it alone in the line)?"""
        free = self._cap() - self.in_flight
        if free < 1:
            return False
        if priority == "interactive" and len(self._tenants) == 1:
            return True  # it is the only tenant: no slot is kept for another
        kept = self._reserved(now)
        return not kept or free >= _needed(kept, sum(kept.values()), tenant, priority)

    def _next(self) -> _Waiter | None:
        now = self.clock()
        kept = self._reserved(now)
        free = self._cap() - self.in_flight
        all_kept = sum(kept.values())
        for priority in PRIORITIES:
            best: _Waiter | None = None
            for tenant in self._tenants.values():
                line = tenant.queues[priority]
                if not line:
                    continue
                head = line[0]
                needed = _needed(kept, all_kept, tenant, priority)
                if free >= needed and (best is None or head.tag < best.tag):
                    best = head
            if best is not None:
                return best
            if priority == "interactive" and any(
                t.queues["interactive"] for t in self._tenants.values()
            ):
                break  # interactive requests are waiting: no batch request goes first
        self._wake_later(now, kept)
        return None

    def _wake_later(self, now: float, kept: dict[str, int]) -> None:
        """Slots are kept free for tenants that may not come back: look again when the
        first of them is forgotten (``window_s`` after it last asked)."""
        if self._timer is not None or not self._queued or not kept:
            return
        due = [self._tenants[name].seen + self.window_s for name in kept]
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # released outside a loop: the next acquire looks again

        def wake() -> None:
            self._timer = None
            self._roll(self.clock())
            self._dispatch()

        self._timer = loop.call_later(max(min(due) - now, 0.0) + 1e-3, wake)

    def _take(self, tenant: _Tenant, priority: Priority) -> None:
        self.in_flight += 1
        tenant.in_flight += 1
        if priority == "interactive":
            tenant.interactive += 1
            self._note_demand(tenant)

    def _release(self, tenant: _Tenant, priority: Priority) -> None:
        self.in_flight -= 1
        tenant.in_flight -= 1
        if priority == "interactive":
            tenant.interactive -= 1
        self._dispatch()

    def _bound(self, arrived: _Waiter) -> _Waiter | None:
        """Keep the line within its bounds: refuse the arrival, or the newest waiter of
        the tenant queueing the most (batch first); None when nobody is refused."""
        line = arrived.tenant.queues[arrived.share.priority]
        if len(line) > self.tenant_queue:
            self._leave(arrived)
            return arrived
        if self._queued <= self.max_queue:
            return None
        victim = arrived
        for priority in reversed(PRIORITIES):
            longest = max(self._tenants.values(), key=lambda t: len(t.queues[priority]))
            if longest.queues[priority]:
                victim = longest.queues[priority][-1]
                if len(longest.queues[priority]) <= len(line) and priority == (
                    arrived.share.priority
                ):
                    victim = arrived  # the arrival's tenant queues as much: it is refused
                break
        if victim is arrived:
            self._leave(victim)
        else:
            self._leave(victim, self._overloaded(f"{self.name} is at capacity; retry shortly."))
        return victim

    def _leave(self, waiter: _Waiter, error: EngineOverloaded | None = None) -> None:
        line = waiter.tenant.queues[waiter.share.priority]
        with contextlib.suppress(ValueError):
            line.remove(waiter)
            self._queued -= 1
        if not waiter.future.done():
            if error is None:
                waiter.future.cancel()
            else:
                waiter.future.set_exception(error)
        self._observe(waiter.tenant, waiter.share.priority)
        self._dispatch()  # the line changed: someone held back may go now

    def _overloaded(self, message: str) -> EngineOverloaded:
        self.rejected += 1
        return EngineOverloaded(message, engine=self.name)

    def _observe(self, tenant: _Tenant, priority: Priority) -> None:
        if self.observer is not None:
            self.observer(priority, tenant.label, len(tenant.queues[priority]))


def _needed(kept: dict[str, int], all_kept: int, tenant: _Tenant, priority: Priority) -> int:
    """Free slots there must be for ``tenant`` to take one at ``priority``: one beyond the
    slots kept for the others; a batch request leaves every interactive reservation free,
    its own tenant's too."""
    return (all_kept if priority == "batch" else all_kept - kept.get(tenant.name, 0)) + 1


def _handed(future: asyncio.Future[None]) -> bool:
    """Was this waiter handed a slot (not refused, not cancelled)?"""
    return future.done() and not future.cancelled() and future.exception() is None


class Slot:
    """One held place in a bulkhead; ``release`` is idempotent."""

    __slots__ = ("_bulkhead", "_priority", "_tenant")

    def __init__(self, bulkhead: Bulkhead, tenant: _Tenant, priority: Priority) -> None:
        self._bulkhead: Bulkhead | None = bulkhead
        self._tenant = tenant
        self._priority: Priority = priority

    def release(self) -> None:
        if self._bulkhead is not None:
            bulkhead, self._bulkhead = self._bulkhead, None
            bulkhead._release(self._tenant, self._priority)
