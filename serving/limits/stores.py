"""Which limit store a configuration gets."""

from __future__ import annotations

from serving.limits.redis_store import RedisLimitStore
from serving.limits.store import LimitStore, MemoryLimitStore


def make_limit_store(redis_url: str | None, timeout_s: float) -> LimitStore:
    if redis_url:
        return RedisLimitStore(redis_url, timeout_s=timeout_s)
    return MemoryLimitStore()
