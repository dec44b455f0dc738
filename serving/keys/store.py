"""Key stores: Redis when configured (shared by every gateway), else a local JSON file.

Both implement ``KeyStore``. Errors talking to Redis become ``KeyStoreUnavailable``
here, at the adapter; the auth middleware turns that into a 503.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from serving.errors import AuthUnavailable
from serving.keys.records import KeyRecord, hash_secret, same_hash

REDIS_PREFIX = "weir:key:"
MIN_ID = 6


class KeyStoreUnavailable(AuthUnavailable):
    """The key store could not be reached (a 503 ``auth_unavailable``)."""


class UnknownKey(Exception):
    """No key has that id."""


class KeyStore(Protocol):
    async def add(self, record: KeyRecord) -> None: ...

    async def lookup(self, secret: str) -> KeyRecord | None: ...

    async def list(self) -> list[KeyRecord]: ...

    async def revoke(self, key_id: str) -> KeyRecord: ...

    async def aclose(self) -> None: ...


def _matching(records: list[KeyRecord], key_id: str) -> KeyRecord:
    """The one record whose id starts with ``key_id`` (at least 6 hex digits)."""
    found = [r for r in records if len(key_id) >= MIN_ID and r.hash.startswith(key_id)]
    if len(found) != 1:
        raise UnknownKey(f"no key with id {key_id}")
    return found[0]


class FileKeyStore:
    """One JSON file of records by hash, rewritten atomically. One process at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path.expanduser()
        self._lock = asyncio.Lock()
        self._cache: tuple[tuple[int, int, int], dict[str, KeyRecord]] | None = None

    def __repr__(self) -> str:
        return f"FileKeyStore(path={str(self.path)!r})"

    def _read(self) -> dict[str, KeyRecord]:
        """The records, re-read only when the file changed (a stat per lookup, not a parse)."""
        try:
            info = self.path.stat()
        except FileNotFoundError:
            return {}
        # every write is a new file (os.replace), so the inode changes even within one
        # mtime tick
        stamp = (info.st_ino, info.st_mtime_ns, info.st_size)
        if self._cache is None or self._cache[0] != stamp:
            raw = json.loads(self.path.read_text())
            self._cache = (stamp, {h: KeyRecord.from_dict(r) for h, r in raw.items()})
        return dict(self._cache[1])

    def _write(self, records: dict[str, KeyRecord]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".keys-", dir=self.path.parent)
        with os.fdopen(fd, "w") as handle:
            json.dump({h: r.to_dict() for h, r in records.items()}, handle, indent=2)
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)

    async def add(self, record: KeyRecord) -> None:
        async with self._lock:
            records = self._read()
            records[record.hash] = record
            self._write(records)

    async def lookup(self, secret: str) -> KeyRecord | None:
        digest = hash_secret(secret)
        record = self._read().get(digest)
        if record is None or not same_hash(record.hash, digest):
            return None
        return record

    async def list(self) -> list[KeyRecord]:
        return sorted(self._read().values(), key=lambda r: r.created)

    async def revoke(self, key_id: str) -> KeyRecord:
        async with self._lock:
            records = self._read()
            record = _matching(list(records.values()), key_id)
            revoked = KeyRecord.from_dict({**record.to_dict(), "revoked": True})
            records[record.hash] = revoked
            self._write(records)
            return revoked

    async def aclose(self) -> None:
        return None


class RedisKeyStore:
    """``weir:key:<sha256>`` holds each record as JSON; shared by every gateway."""

    def __init__(self, url: str, *, timeout_s: float = 0.5) -> None:
        self.url = url
        self._redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )

    def __repr__(self) -> str:
        return f"RedisKeyStore(url={self.url!r})"

    async def add(self, record: KeyRecord) -> None:
        await self._call(self._redis.set(REDIS_PREFIX + record.hash, json.dumps(record.to_dict())))

    async def lookup(self, secret: str) -> KeyRecord | None:
        digest = hash_secret(secret)
        raw = await self._call(self._redis.get(REDIS_PREFIX + digest))
        if raw is None:
            return None
        record = KeyRecord.from_dict(json.loads(raw))
        return record if same_hash(record.hash, digest) else None

    async def list(self) -> list[KeyRecord]:
        try:
            names = [n async for n in self._redis.scan_iter(match=REDIS_PREFIX + "*")]
        except (RedisError, OSError) as exc:
            raise KeyStoreUnavailable(f"key store unreachable: {type(exc).__name__}") from exc
        values = await self._call(self._redis.mget(names)) if names else []
        records = [KeyRecord.from_dict(json.loads(v)) for v in values if v is not None]
        return sorted(records, key=lambda r: r.created)

    async def revoke(self, key_id: str) -> KeyRecord:
        record = _matching(await self.list(), key_id)
        revoked = KeyRecord.from_dict({**record.to_dict(), "revoked": True})
        await self.add(revoked)
        return revoked

    async def aclose(self) -> None:
        await self._redis.aclose()

    async def _call(self, awaitable: Awaitable[Any]) -> Any:
        try:
            return await awaitable
        except (RedisError, OSError) as exc:
            raise KeyStoreUnavailable(f"key store unreachable: {type(exc).__name__}") from exc


def make_key_store(path: Path, redis_url: str | None, timeout_s: float) -> KeyStore:
    if redis_url:
        return RedisKeyStore(redis_url, timeout_s=timeout_s)
    return FileKeyStore(path)
