"""Stored responses, by tenant: Redis (shared by every gateway) or SQLite (one host).

A record is opaque bytes here (``service`` decides what is in it), kept under the
caller's tenant and the response id, for ``ttl_s`` seconds. A record stored under one
tenant does not exist for another: every read and delete names the tenant.

A tenant keeps at most ``max_records`` records of at most ``max_bytes`` in all
(``responses.max_tenant_records``, ``max_tenant_bytes``): a ``put`` past either evicts the
tenant's oldest records (those that expire first) until it fits, in the same transaction
(a Redis script; a SQLite write transaction), so gateways sharing the store count the
same. The record just written is always kept. Another tenant's records are never touched.

Both stores turn their library's errors into ``ResponsesUnavailable`` (503) here, at the
adapter. Nothing a request carries chooses a path or a host: the tenant and id are only
ever keys.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol, TypeVar

from redis.exceptions import RedisError

from serving.errors import ResponsesUnavailable
from serving.redis_client import bounded_redis, close
from serving.sqlite_file import SqliteFile

REDIS_PREFIX = "weir:response:"
INDEX_PREFIX = "weir:response-index:"  # a tenant's record ids by their expiry (a sorted set)
SIZES_PREFIX = "weir:response-bytes:"  # a tenant's record sizes, and "#total", their sum
UNCAPPED = 2**53  # a count or size no tenant reaches (Lua numbers are doubles)
PURGE_EVERY_S = 60.0  # SQLite: expired rows are deleted at most this often (on a write)
T = TypeVar("T")


class ResponseStore(Protocol):
    async def get(self, tenant: str, response_id: str) -> bytes | None: ...

    async def put(self, tenant: str, response_id: str, record: bytes, ttl_s: int) -> int:
        """Store the record; how many of the tenant's oldest were evicted for it."""
        ...

    async def delete(self, tenant: str, response_id: str) -> bool: ...

    async def aclose(self) -> None: ...


# KEYS: the record, the tenant's index and sizes. ARGV: id, record, ttl_s, max_records,
# max_bytes, the tenant's record key prefix. Returns how many records were evicted.
_PUT = """
local id, record, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local max_records, max_bytes, prefix = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1e6
local function forget(member)
  local size = redis.call('HGET', KEYS[3], member)
  if size then
    redis.call('HDEL', KEYS[3], member)
    redis.call('HINCRBY', KEYS[3], '#total', 0 - tonumber(size))
  end
  redis.call('ZREM', KEYS[2], member)
end
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  forget(member)
end
forget(id)
redis.call('SET', KEYS[1], record, 'EX', ttl)
redis.call('ZADD', KEYS[2], now + ttl, id)
redis.call('HSET', KEYS[3], id, #record)
local total = redis.call('HINCRBY', KEYS[3], '#total', #record)
local evicted = 0
while redis.call('ZCARD', KEYS[2]) > max_records or total > max_bytes do
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
  if not oldest or oldest == id then break end
  forget(oldest)
  redis.call('DEL', prefix .. oldest)
  total = tonumber(redis.call('HGET', KEYS[3], '#total'))
  evicted = evicted + 1
end
for i = 2, 3 do
  if redis.call('TTL', KEYS[i]) < ttl then redis.call('EXPIRE', KEYS[i], ttl) end
end
return evicted
"""
# KEYS: the record, the tenant's index and sizes. ARGV: id. Returns 1 when it was there.
_DELETE = """
local deleted = redis.call('DEL', KEYS[1])
local size = redis.call('HGET', KEYS[3], ARGV[1])
if size then
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('HINCRBY', KEYS[3], '#total', 0 - tonumber(size))
end
redis.call('ZREM', KEYS[2], ARGV[1])
return deleted
"""


class RedisResponseStore:
    """``weir:response:<tenant>:<id>`` strings with a TTL (run Redis with noeviction: an
    evicted record is a conversation lost), and per tenant a sorted set of its ids by
    expiry and a hash of their sizes, kept with them by one script per write."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 0.5,
        connections: int = 32,
        max_records: int | None = None,
        max_bytes: int | None = None,
    ) -> None:
        self.url = url
        self.max_records = max_records or UNCAPPED
        self.max_bytes = max_bytes or UNCAPPED
        self._redis = bounded_redis(url, timeout_s, connections)
        self._put = self._redis.register_script(_PUT)
        self._delete = self._redis.register_script(_DELETE)

    def __repr__(self) -> str:
        return f"RedisResponseStore(url={self.url!r})"

    @staticmethod
    def key(tenant: str, response_id: str) -> str:
        return f"{REDIS_PREFIX}{tenant}:{response_id}"

    async def get(self, tenant: str, response_id: str) -> bytes | None:
        found = await self._call(self._redis.get(self.key(tenant, response_id)))
        return found.encode() if isinstance(found, str) else found

    async def put(self, tenant: str, response_id: str, record: bytes, ttl_s: int) -> int:
        args: list[bytes | str | int] = [response_id, record, ttl_s, self.max_records,
                                         self.max_bytes, self.key(tenant, "")]  # fmt: skip
        evicted = await self._call(self._put(keys=self._keys(tenant, response_id), args=args))
        return int(evicted)

    async def delete(self, tenant: str, response_id: str) -> bool:
        keys = self._keys(tenant, response_id)
        deleted = await self._call(self._delete(keys=keys, args=[response_id]))
        return int(deleted) > 0

    def _keys(self, tenant: str, response_id: str) -> list[str]:
        return [self.key(tenant, response_id), INDEX_PREFIX + tenant, SIZES_PREFIX + tenant]

    async def aclose(self) -> None:
        await close(self._redis)

    async def _call(self, awaitable: Awaitable[T]) -> T:
        try:
            return await awaitable
        except (RedisError, OSError, TimeoutError) as exc:
            raise ResponsesUnavailable(
                f"The response store is unreachable ({type(exc).__name__})."
            ) from exc


class SqliteResponseStore:
    """One SQLite file (WAL), opened on first use; gateway processes on one host share it.
    Calls run in a worker thread, one at a time; ``clock`` is wall time (tests pass theirs)."""

    def __init__(
        self,
        path: Path,
        *,
        timeout_s: float = 5.0,
        clock: Callable[[], float] = time.time,
        max_records: int | None = None,
        max_bytes: int | None = None,
    ) -> None:
        self.path = path.expanduser()
        self.clock = clock
        self.max_records = max_records or UNCAPPED
        self.max_bytes = max_bytes or UNCAPPED
        self._file = SqliteFile(
            self.path,
            timeout_s=timeout_s,
            setup=(
                "CREATE TABLE IF NOT EXISTS responses (tenant TEXT NOT NULL, id TEXT NOT NULL, "
                "record BLOB NOT NULL, expires_at REAL NOT NULL, PRIMARY KEY (tenant, id))",
                "CREATE INDEX IF NOT EXISTS responses_expiry ON responses (expires_at)",
                "CREATE INDEX IF NOT EXISTS responses_tenant ON responses (tenant, expires_at)",
            ),
            unavailable=lambda why: ResponsesUnavailable(
                f"The response store is unavailable ({why})."
            ),
        )
        self._purged = float("-inf")

    def __repr__(self) -> str:
        return f"SqliteResponseStore(path={str(self.path)!r})"

    async def get(self, tenant: str, response_id: str) -> bytes | None:
        def read(db: sqlite3.Connection) -> bytes | None:
            row = db.execute(
                "SELECT record FROM responses WHERE tenant = ? AND id = ? AND expires_at > ?",
                (tenant, response_id, self.clock()),
            ).fetchone()
            return bytes(row[0]) if row is not None else None

        return await self._run(read)

    async def put(self, tenant: str, response_id: str, record: bytes, ttl_s: int) -> int:
        def write(db: sqlite3.Connection) -> int:
            now = self.clock()
            db.execute("BEGIN IMMEDIATE")  # one writer at a time, processes included
            try:
                db.execute(
                    "INSERT OR REPLACE INTO responses (tenant, id, record, expires_at) "
                    "VALUES (?, ?, ?, ?)",
                    (tenant, response_id, record, now + ttl_s),
                )
                evicted = self._evict(db, tenant, response_id, now)
                if now - self._purged >= PURGE_EVERY_S:
                    self._purged = now
                    db.execute("DELETE FROM responses WHERE expires_at <= ?", (now,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return evicted

        return await self._run(write)

    def _evict(self, db: sqlite3.Connection, tenant: str, kept: str, now: float) -> int:
        """Delete the tenant's oldest records (not ``kept``) until it is within its caps."""
        db.execute("DELETE FROM responses WHERE tenant = ? AND expires_at <= ?", (tenant, now))
        count, size = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(record)), 0) FROM responses WHERE tenant = ?",
            (tenant,),
        ).fetchone()
        if count <= self.max_records and size <= self.max_bytes:
            return 0
        oldest = db.execute(
            "SELECT id, LENGTH(record) FROM responses WHERE tenant = ? AND id != ? "
            "ORDER BY expires_at, id",
            (tenant, kept),
        ).fetchall()
        gone: list[tuple[str, str]] = []
        for response_id, length in oldest:
            if count <= self.max_records and size <= self.max_bytes:
                break
            gone.append((tenant, response_id))
            count, size = count - 1, size - length
        db.executemany("DELETE FROM responses WHERE tenant = ? AND id = ?", gone)
        return len(gone)

    async def delete(self, tenant: str, response_id: str) -> bool:
        def remove(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "DELETE FROM responses WHERE tenant = ? AND id = ? AND expires_at > ?",
                (tenant, response_id, self.clock()),
            )
            return cursor.rowcount > 0

        return await self._run(remove)

    async def aclose(self) -> None:
        await self._file.aclose()

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        return await self._file.run(work)


def make_response_store(
    redis_url: str | None,
    sqlite_path: Path,
    timeout_s: float,
    *,
    max_records: int | None = None,
    max_bytes: int | None = None,
) -> ResponseStore:
    """Redis when a URL is given, else the SQLite file; each tenant within ``max_records``
    and ``max_bytes`` (None: uncapped)."""
    if redis_url:
        return RedisResponseStore(
            redis_url, timeout_s=timeout_s, max_records=max_records, max_bytes=max_bytes
        )
    return SqliteResponseStore(sqlite_path, max_records=max_records, max_bytes=max_bytes)
