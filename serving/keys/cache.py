"""Key lookups remembered for a few seconds, shared by concurrent requests, kept through
a key-store blip.

A gateway looks its keys up on every request; without this, a burst of N requests with
one key is N Redis round trips queued on a bounded pool (a 180-request burst on one
2-core gateway timed some out: 503 ``auth_unavailable``), and a Redis restart is an auth
outage. Here:

- a found record is reused for ``ttl_s`` (a revocation reaches other gateways within
  that; the gateway that revokes forgets at once); an unknown key for ``negative_ttl_s``;
- concurrent lookups of the same key share one store call;
- revocation wins: a key this gateway has seen revoked (revoked here, or a lookup that
  came back revoked) stays revoked here, whatever the store or the cache says later, and
  while the store is unreachable it gets 401, never a stale record;
- when the store is unreachable, a record confirmed within ``stale_s`` is still used
  (logged), so a Redis blip does not turn away known keys; unknown keys still get 503.
  Off by default (``stale_s = 0``): a gateway cannot learn of a revocation made elsewhere
  (the CLI, another gateway) while Redis is down, so a record kept past its ``ttl_s``
  may be one that was revoked in the meantime. Turn it on only if keeping known keys
  working through an outage is worth that.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from serving.keys.records import KeyRecord, hash_secret
from serving.keys.store import KeyStore, KeyStoreUnavailable

log = logging.getLogger("weir.keys")


@dataclass
class _Entry:
    record: KeyRecord | None
    at: float


class CachedKeyStore:
    def __init__(
        self,
        store: KeyStore,
        *,
        ttl_s: float = 5.0,
        negative_ttl_s: float = 1.0,
        stale_s: float = 0.0,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.negative_ttl_s = negative_ttl_s
        self.stale_s = stale_s
        self.max_entries = max_entries
        self.clock = clock
        self._entries: dict[str, _Entry] = {}
        self._revoked: dict[str, KeyRecord] = {}  # by digest: revocations seen here
        self._pending: dict[str, asyncio.Future[KeyRecord | None]] = {}

    def __repr__(self) -> str:
        return f"CachedKeyStore({self.store!r}, ttl_s={self.ttl_s})"

    async def lookup(self, secret: str) -> KeyRecord | None:
        digest = hash_secret(secret)
        revoked = self._revoked.get(digest)
        if revoked is not None:
            return revoked  # final: no store call, no stale record can override it
        entry = self._entries.get(digest)
        now = self.clock()
        if entry is not None:
            ttl = self.ttl_s if entry.record is not None else self.negative_ttl_s
            if now - entry.at < ttl:
                return entry.record
        pending = self._pending.get(digest)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[KeyRecord | None] = asyncio.get_running_loop().create_future()
        self._pending[digest] = future
        try:
            record = await self.store.lookup(secret)
        except KeyStoreUnavailable as exc:
            if entry is not None and entry.record is not None and now - entry.at < self.stale_s:
                log.warning("key store unreachable; using key %s as seen %.0fs ago",
                            entry.record.id, now - entry.at)  # fmt: skip
                future.set_result(entry.record)
                return entry.record
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when no one waits
            raise
        finally:
            self._pending.pop(digest, None)
        if record is not None and record.revoked:
            self._remember_revoked(record)
        if len(self._entries) >= self.max_entries:
            self._entries.clear()  # bounded: start over rather than grow without end
        self._entries[digest] = _Entry(record, self.clock())
        future.set_result(record)
        return record

    async def add(self, record: KeyRecord) -> None:
        await self.store.add(record)
        self._entries.pop(record.hash, None)

    async def list(self) -> list[KeyRecord]:
        return await self.store.list()

    async def revoke(self, key_id: str) -> KeyRecord:
        revoked = await self.store.revoke(key_id)
        self._entries.pop(revoked.hash, None)
        self._remember_revoked(revoked)
        return revoked

    def _remember_revoked(self, record: KeyRecord) -> None:
        if len(self._revoked) >= self.max_entries:
            del self._revoked[next(iter(self._revoked))]  # bounded: the oldest goes first
        self._revoked[record.hash] = record

    async def aclose(self) -> None:
        await self.store.aclose()
