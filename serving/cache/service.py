"""The cache as the proxy sees it: look up, store in the background, never fail a request.

Lookups wait at most the store's timeout; any store failure is counted
(``weir_cache_requests_total{result="error"}``) and the request goes on as a miss.
Writes happen after the answer is sent. Embeddings are packed float32.
"""

from __future__ import annotations

import asyncio
import logging
from array import array
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from serving.cache.store import CacheStore, CacheUnavailable

log = logging.getLogger("weir.cache")
JSON = dict[str, Any]
Count = Callable[[str, str, int], None]  # kind, result, how many


class Cache:
    def __init__(
        self,
        store: CacheStore,
        *,
        ttl_s: int,
        max_entry_bytes: int,
        charge_hits: bool = False,
        count: Count | None = None,
    ) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.max_entry_bytes = max_entry_bytes
        self.charge_hits = charge_hits
        self.count = count or (lambda kind, result, n: None)
        self._pending: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"Cache(store={self.store!r}, ttl_s={self.ttl_s})"

    async def lookup(self, key: str) -> JSON | None:
        try:
            found = (await self.store.get_many([key]))[0]
        except CacheUnavailable as exc:
            log.warning("cache lookup skipped: %s", exc)
            self.count("response", "error", 1)
            return None
        if found is None:
            return None
        entry: JSON = orjson.loads(found)
        return entry

    def store_soon(self, key: str, entry: JSON) -> None:
        raw = orjson.dumps(entry)
        if len(raw) > self.max_entry_bytes:
            return
        self._spawn(self._set([(key, raw)], "response"))

    async def lookup_vectors(self, keys: Sequence[str]) -> list[list[float] | None]:
        """Every key in one round trip; all misses if the store fails."""
        try:
            found = await self.store.get_many(keys)
        except CacheUnavailable as exc:
            log.warning("embedding cache lookup skipped: %s", exc)
            self.count("embedding", "error", len(keys))
            return [None] * len(keys)
        return [None if raw is None else array("f", raw).tolist() for raw in found]

    def store_vectors_soon(self, items: Sequence[tuple[str, Sequence[float]]]) -> None:
        packed = [(key, array("f", vector).tobytes()) for key, vector in items]
        self._spawn(self._set(packed, "embedding"))

    async def _set(self, items: list[tuple[str, bytes]], kind: str) -> None:
        try:
            await self.store.set_many(items, self.ttl_s)
        except CacheUnavailable as exc:
            log.warning("cache write skipped: %s", exc)
            self.count(kind, "error", len(items))

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def drain(self) -> None:
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    async def aclose(self) -> None:
        await self.drain()
        await self.store.aclose()
