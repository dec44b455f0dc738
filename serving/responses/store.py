"""Stored responses, by tenant: Redis (shared by every gateway) or SQLite (one host).

A record is opaque bytes here (``service`` decides what is in it), kept under the
caller's tenant and the response id, for ``ttl_s`` seconds. A record stored under one
tenant does not exist for another: every read and delete names the tenant.

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
PURGE_EVERY_S = 60.0  # SQLite: expired rows are deleted at most this often (on a write)
T = TypeVar("T")


class ResponseStore(Protocol):
    async def get(self, tenant: str, response_id: str) -> bytes | None: ...

    async def put(self, tenant: str, response_id: str, record: bytes, ttl_s: int) -> None: ...

    async def delete(self, tenant: str, response_id: str) -> bool: ...

    async def aclose(self) -> None: ...


class RedisResponseStore:
    """``weir:response:<tenant>:<id>`` strings with a TTL (run Redis with noeviction: an
    evicted record is a conversation lost)."""

    def __init__(self, url: str, *, timeout_s: float = 0.5, connections: int = 32) -> None:
        self.url = url
        self._redis = bounded_redis(url, timeout_s, connections)

    def __repr__(self) -> str:
        return f"RedisResponseStore(url={self.url!r})"

    @staticmethod
    def key(tenant: str, response_id: str) -> str:
        return f"{REDIS_PREFIX}{tenant}:{response_id}"

    async def get(self, tenant: str, response_id: str) -> bytes | None:
        found = await self._call(self._redis.get(self.key(tenant, response_id)))
        return found.encode() if isinstance(found, str) else found

    async def put(self, tenant: str, response_id: str, record: bytes, ttl_s: int) -> None:
        await self._call(self._redis.set(self.key(tenant, response_id), record, ex=ttl_s))

    async def delete(self, tenant: str, response_id: str) -> bool:
        deleted: int = await self._call(self._redis.delete(self.key(tenant, response_id)))
        return deleted > 0

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
        self, path: Path, *, timeout_s: float = 5.0, clock: Callable[[], float] = time.time
    ) -> None:
        self.path = path.expanduser()
        self.clock = clock
        self._file = SqliteFile(
            self.path,
            timeout_s=timeout_s,
            setup=(
                "CREATE TABLE IF NOT EXISTS responses (tenant TEXT NOT NULL, id TEXT NOT NULL, "
                "record BLOB NOT NULL, expires_at REAL NOT NULL, PRIMARY KEY (tenant, id))",
                "CREATE INDEX IF NOT EXISTS responses_expiry ON responses (expires_at)",
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

    async def put(self, tenant: str, response_id: str, record: bytes, ttl_s: int) -> None:
        def write(db: sqlite3.Connection) -> None:
            now = self.clock()
            db.execute(
                "INSERT OR REPLACE INTO responses (tenant, id, record, expires_at) "
                "VALUES (?, ?, ?, ?)",
                (tenant, response_id, record, now + ttl_s),
            )
            if now - self._purged >= PURGE_EVERY_S:
                self._purged = now
                db.execute("DELETE FROM responses WHERE expires_at <= ?", (now,))

        await self._run(write)

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
    redis_url: str | None, sqlite_path: Path, timeout_s: float
) -> ResponseStore:
    """Redis when a URL is given, else the SQLite file."""
    if redis_url:
        return RedisResponseStore(redis_url, timeout_s=timeout_s)
    return SqliteResponseStore(sqlite_path)
