"""Cache stores: Redis (shared, with its own eviction policy) or in-process LRU.

Both answer ``get_many`` and ``set_many`` in one round trip. Redis errors and timeouts
become ``CacheUnavailable`` here; callers skip the cache, never fail the request.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from redis.exceptions import RedisError

from serving.redis_client import bounded_redis, close

PREFIX = "weir:cache:"


class CacheUnavailable(Exception):
    """The cache store did not answer in time."""


class CacheStore(Protocol):
    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]: ...

    async def set_many(self, items: Sequence[tuple[str, bytes]], ttl_s: int) -> None: ...

    async def aclose(self) -> None: ...


@dataclass
class MemoryCacheStore:
    """Bounded by total bytes; least recently used entries go first. One process only."""

    max_bytes: int = 64 * 2**20
    clock: Any = time.monotonic
    _entries: OrderedDict[str, tuple[bytes, float]] = field(default_factory=OrderedDict)
    _bytes: int = 0

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        now = self.clock()
        found: list[bytes | None] = []
        for key in keys:
            entry = self._entries.get(key)
            if entry is None or entry[1] <= now:
                if entry is not None:
                    self._drop(key)
                found.append(None)
                continue
            self._entries.move_to_end(key)
            found.append(entry[0])
        return found

    async def set_many(self, items: Sequence[tuple[str, bytes]], ttl_s: int) -> None:
        expires = self.clock() + ttl_s
        for key, value in items:
            if len(value) > self.max_bytes:
                continue
            if key in self._entries:
                self._drop(key)
            self._entries[key] = (value, expires)
            self._bytes += len(value)
            while self._bytes > self.max_bytes:
                self._drop(next(iter(self._entries)))

    async def aclose(self) -> None:
        return None

    def _drop(self, key: str) -> None:
        value, _ = self._entries.pop(key)
        self._bytes -= len(value)

    @property
    def size_bytes(self) -> int:
        return self._bytes


class RedisCacheStore:
    """``weir:cache:<key>`` strings with a TTL; use a Redis with ``allkeys-lru``."""

    def __init__(self, url: str, *, timeout_s: float = 0.1, connections: int = 64) -> None:
        self.url = url
        self._redis = bounded_redis(url, timeout_s, connections)

    def __repr__(self) -> str:
        return f"RedisCacheStore(url={self.url!r})"

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        found: list[bytes | None] = await self._call(self._redis.mget([PREFIX + k for k in keys]))
        return found

    async def set_many(self, items: Sequence[tuple[str, bytes]], ttl_s: int) -> None:
        if not items:
            return
        pipe = self._redis.pipeline(transaction=False)
        for key, value in items:
            pipe.set(PREFIX + key, value, ex=ttl_s)
        await self._call(pipe.execute())

    async def aclose(self) -> None:
        await close(self._redis)

    async def _call(self, awaitable: Awaitable[Any]) -> Any:
        try:
            return await awaitable
        except (RedisError, OSError, TimeoutError) as exc:
            raise CacheUnavailable(f"cache unreachable: {type(exc).__name__}") from exc
