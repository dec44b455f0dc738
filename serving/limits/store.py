"""Limit stores: the protocol, what they answer, and the in-process store.

``MemoryLimitStore`` is the default without Redis and the fail-open fallback while
Redis is down. It has the same semantics as ``RedisLimitStore`` for one process; it
shares nothing across processes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from serving.limits.plan import DAY, MONTH, TOTAL, UNLIMITED, Check

Clock = Callable[[], float]


class LimitStoreUnavailable(Exception):
    """The store could not be reached in time (translated from the Redis client's errors)."""


@dataclass(frozen=True)
class Standing:
    """One check as the store saw it: its effective limit and what is left after this request."""

    check: Check
    limit: int
    remaining: int
    reset_s: float


@dataclass(frozen=True)
class Decision:
    admitted: bool
    standings: tuple[Standing, ...]
    denied: Standing | None = None


@dataclass(frozen=True)
class Outstanding:
    reservations: int
    tokens: int


class LimitStore(Protocol):
    async def admit(
        self, rid: str, model: str, checks: Sequence[Check], lease_s: float
    ) -> Decision: ...

    async def settle(self, rid: str, used_tokens: int, cost: int = 0) -> bool: ...

    async def set_model_tpm(self, model: str, tpm: int | None) -> None: ...

    async def model_tpms(self) -> dict[str, int]: ...

    async def outstanding(self) -> Outstanding: ...

    async def aclose(self) -> None: ...


def month_start(now: float) -> int:
    """The unix time the UTC calendar month of ``now`` began (the days-from-civil arithmetic
    the Lua script does too: Redis has no date functions)."""
    days = math.floor(now / DAY)
    z = days + 719_468
    doe = z - (z // 146_097) * 146_097
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day_of_month = doy - (153 * mp + 2) // 5 + 1
    return (days - day_of_month + 1) * DAY


def window_start(now: float, window_s: int) -> int:
    if window_s == MONTH:
        return month_start(now)
    return math.floor(now / window_s) * window_s


def window_end(start: int, window_s: int) -> int:
    if window_s == MONTH:
        return month_start(start + 32 * DAY)
    return start + window_s


def counter_ttl(window_s: int) -> float | None:
    """How long a window's counter lives: two windows (a total's: for ever)."""
    if window_s == TOTAL:
        return None
    return 62 * DAY if window_s == MONTH else 2 * window_s


@dataclass
class _Held:
    checks: tuple[Check, ...]
    keys: tuple[str, ...]
    tokens: int
    expires: float


@dataclass
class MemoryLimitStore:
    clock: Clock = time.time
    _counters: dict[str, tuple[int, float]] = field(default_factory=dict)  # key: value, expiry
    _slots: dict[str, dict[str, float]] = field(default_factory=dict)  # scope: rid -> lease end
    _held: dict[str, _Held] = field(default_factory=dict)
    _model_tpm: dict[str, int] = field(default_factory=dict)
    _admits: int = 0

    async def admit(
        self, rid: str, model: str, checks: Sequence[Check], lease_s: float
    ) -> Decision:
        now = self.clock()
        self._sweep(now)
        standings: list[Standing] = []
        keys: list[str] = []
        denied: Standing | None = None
        for check in checks:
            limit = check.limit
            if check.kind == "model_tokens":
                limit = self._model_tpm.get(model, limit)
            if check.kind == "concurrency":
                slots = self._slots.setdefault(check.scope, {})
                for other in [r for r, end in slots.items() if end <= now]:
                    del slots[other]
                used, reset, key = len(slots), 1.0, check.scope
            elif check.window_s == TOTAL:
                key = check.scope
                value, expiry = self._counters.get(key, (0, math.inf))
                used = value if expiry > now else 0
                reset = 0.0
            else:
                start = window_start(now, check.window_s)
                key = f"{check.scope}:{start}"
                value, expiry = self._counters.get(key, (0, 0.0))
                used = value if expiry > now else 0
                reset = window_end(start, check.window_s) - now
            keys.append(key)
            remaining = UNLIMITED if limit < 0 else limit - used - check.amount
            standing = Standing(check, limit, max(remaining, 0) if limit >= 0 else UNLIMITED, reset)
            if limit >= 0 and remaining < 0 and denied is None:
                denied = Standing(check, limit, max(limit - used, 0), reset)
            standings.append(standing)
        if denied is not None:
            return Decision(False, tuple(standings), denied)
        tokens = 0
        for check, key in zip(checks, keys, strict=True):
            if check.kind == "concurrency":
                self._slots[check.scope][rid] = now + lease_s
                continue
            value, expiry = self._counters.get(key, (0, 0.0))
            value = value if expiry > now else 0
            ttl = counter_ttl(check.window_s)
            self._counters[key] = (value + check.amount, math.inf if ttl is None else now + ttl)
            if check.counts_tokens:
                tokens = max(tokens, check.amount)
        self._held[rid] = _Held(tuple(checks), tuple(keys), tokens, now + lease_s)
        return Decision(True, tuple(standings))

    async def settle(self, rid: str, used_tokens: int, cost: int = 0) -> bool:
        return self.settle_now(rid, used_tokens, cost)

    def settle_now(self, rid: str, used_tokens: int, cost: int = 0) -> bool:
        held = self._held.pop(rid, None)
        if held is None:
            return False
        now = self.clock()
        for check, key in zip(held.checks, held.keys, strict=True):
            if check.kind == "concurrency":
                self._slots.get(key, {}).pop(rid, None)
            elif (check.counts_tokens or check.counts_money) and key in self._counters:
                used = cost if check.counts_money else used_tokens
                value, expiry = self._counters[key]
                if expiry > now:
                    self._counters[key] = (max(value + used - check.amount, 0), expiry)
        return True

    async def set_model_tpm(self, model: str, tpm: int | None) -> None:
        if tpm is None:
            self._model_tpm.pop(model, None)
        else:
            self._model_tpm[model] = tpm

    async def model_tpms(self) -> dict[str, int]:
        return dict(self._model_tpm)

    async def outstanding(self) -> Outstanding:
        now = self.clock()
        live = [h for h in self._held.values() if h.expires > now]
        return Outstanding(len(live), sum(h.tokens for h in live))

    async def aclose(self) -> None:
        return None

    def _sweep(self, now: float) -> None:
        """Forget expired windows and leases now and then (every 1024 admissions)."""
        self._admits += 1
        if self._admits % 1024 and len(self._held) < 100_000:
            return
        self._counters = {k: v for k, v in self._counters.items() if v[1] > now}
        for rid in [r for r, h in self._held.items() if h.expires <= now]:
            del self._held[rid]
