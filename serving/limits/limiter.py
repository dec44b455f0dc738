"""The limiter: admit a request or refuse it, and settle what it used, whatever happens.

``admit`` is one store round trip on the hot path. ``Ticket.finish`` settles in the
background (the client never waits on it) and only once, whichever of the success path,
the error path or the closed stream gets there first. When Redis cannot be reached, the
configured policy applies: ``closed`` answers 503, ``open`` admits against a per-process
in-memory store. After a failure Redis is not tried again for ``retry_s``, so an outage
costs each request nothing, and the limiter goes back to Redis by itself.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from serving.billing.budgets import budget_refusal
from serving.errors import BudgetExceeded, LimitsUnavailable, RateLimited
from serving.limits.headers import ratelimit_headers
from serving.limits.plan import Check
from serving.limits.store import (
    Clock,
    Decision,
    LimitStore,
    LimitStoreUnavailable,
    MemoryLimitStore,
    Standing,
)

log = logging.getLogger("weir.limits")
Policy = Literal["closed", "open"]
MESSAGES = {
    "rpm": "requests per minute",
    "tpm": "tokens per minute",
    "tokens_per_day": "tokens per day",
    "max_concurrency": "concurrent requests",
    "model_tpm": "tokens per minute for this model",
}


@dataclass
class Ticket:
    """One admitted request's hold on the limits."""

    limiter: Limiter
    store: LimitStore
    rid: str
    reserved: int
    headers: dict[str, str]
    _done: bool = field(default=False, init=False)

    def finish(self, used_tokens: int | None, cost: int | None = None) -> None:
        """Settle to ``used_tokens`` and ``cost`` (nano-dollars, for budgets); ``None``
        releases the reservation (failure, cancel)."""
        if self._done:
            return
        self._done = True
        self.limiter.settle_soon(self, used_tokens or 0, cost or 0)


class Unlimited:
    """The ticket when limits are off: no headers, nothing to settle."""

    reserved = 0
    headers: dict[str, str] = {}

    def finish(self, used_tokens: int | None, cost: int | None = None) -> None:
        return None


UNLIMITED_TICKET = Unlimited()


class Limiter:
    def __init__(
        self,
        store: LimitStore,
        *,
        policy: Policy = "closed",
        lease_s: float = 900.0,
        retry_s: float = 1.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self.store = store
        self.policy = policy
        self.lease_s = lease_s
        self.retry_s = retry_s
        self.clock = clock
        self.fallback = MemoryLimitStore()
        self._down_until = 0.0
        self._pending: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"Limiter(store={self.store!r}, policy={self.policy!r})"

    async def admit(self, model: str, checks: Sequence[Check]) -> Ticket:
        rid = os.urandom(16).hex()
        store = self.store
        decision: Decision | None = None
        if self.clock() >= self._down_until:
            try:
                decision = await store.admit(rid, model, checks, self.lease_s)
            except LimitStoreUnavailable as exc:
                self._down_until = self.clock() + self.retry_s
                log.error("limit store unreachable (%s); policy: fail %s", exc, self.policy)
        if decision is None:
            if self.policy == "closed":
                raise LimitsUnavailable(
                    "The rate-limit store is unreachable; try again shortly.",
                    retry_after_s=max(1, math.ceil(self.retry_s)),
                )
            store = self.fallback
            decision = await store.admit(rid, model, checks, self.lease_s)
        headers = ratelimit_headers(decision.standings)
        if not decision.admitted:
            assert decision.denied is not None
            raise _refusal(decision.denied, headers)
        reserved = max((c.amount for c in checks if c.counts_tokens), default=0)
        return Ticket(self, store, rid, reserved, headers)

    def settle_soon(self, ticket: Ticket, used_tokens: int, cost: int = 0) -> None:
        if isinstance(ticket.store, MemoryLimitStore):
            # in-process: nothing to wait for
            ticket.store.settle_now(ticket.rid, used_tokens, cost)
            return
        task = asyncio.get_running_loop().create_task(self._settle(ticket, used_tokens, cost))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _settle(self, ticket: Ticket, used_tokens: int, cost: int) -> None:
        try:
            await ticket.store.settle(ticket.rid, used_tokens, cost)
        except LimitStoreUnavailable as exc:
            # the lease frees the slot; the window keeps the reservation (never undercounts)
            log.warning("could not settle reservation %s: %s", ticket.rid[:8], exc)

    async def drain(self) -> None:
        """Wait for every settlement in flight (shutdown, tests)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    async def aclose(self) -> None:
        await self.drain()
        await self.store.aclose()


def _refusal(denied: Standing, headers: dict[str, str]) -> RateLimited | BudgetExceeded:
    check = denied.check
    if check.counts_money:
        return budget_refusal(denied)
    what = MESSAGES.get(check.name, check.name)
    if check.kind == "concurrency":
        message = f"Rate limit reached: at most {denied.limit} {what} for this key."
    elif check.counts_tokens and check.amount > denied.limit:
        message = (
            f"This request needs {check.amount} tokens (prompt plus max_tokens), more than the"
            f" limit of {denied.limit} {what}. Lower max_tokens."
        )
    else:
        message = (
            f"Rate limit reached: {denied.limit} {what}; {denied.remaining} left, this request"
            f" needs {check.amount}. Retry after the window resets."
        )
    retry_after = max(1, math.ceil(denied.reset_s))
    return RateLimited(
        message, retry_after_s=retry_after, headers=headers, param=None, limit=check.name
    )
