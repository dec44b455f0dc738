"""The response stores: SQLite and a real redis-server, the same contract for both;
tenants, retention and an unreachable store."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path

import pytest
import redis

from serving.errors import ResponsesUnavailable, render
from serving.responses.store import (
    RedisResponseStore,
    ResponseStore,
    SqliteResponseStore,
    make_response_store,
)
from tests.redis_server import dead_port

pytestmark = pytest.mark.anyio


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", "redis"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, redis_url: str
) -> AsyncIterator[ResponseStore]:
    made: ResponseStore = (
        SqliteResponseStore(tmp_path / "r.sqlite3")
        if request.param == "sqlite"
        else RedisResponseStore(redis_url)
    )
    try:
        yield made
    finally:
        await made.aclose()


async def test_put_get_delete(store: ResponseStore) -> None:
    tenant, rid = f"key:{time.monotonic_ns()}", "resp_1"
    assert await store.get(tenant, rid) is None
    await store.put(tenant, rid, b'{"a": 1}', ttl_s=60)
    assert await store.get(tenant, rid) == b'{"a": 1}'
    await store.put(tenant, rid, b'{"a": 2}', ttl_s=60)  # a rewrite replaces it
    assert await store.get(tenant, rid) == b'{"a": 2}'
    assert await store.delete(tenant, rid) is True
    assert await store.get(tenant, rid) is None
    assert await store.delete(tenant, rid) is False


async def test_a_tenant_sees_only_its_own(store: ResponseStore) -> None:
    alice, bob = f"key:a{time.monotonic_ns()}", f"key:b{time.monotonic_ns()}"
    await store.put(alice, "resp_x", b"alice's", ttl_s=60)
    assert await store.get(bob, "resp_x") is None
    assert await store.delete(bob, "resp_x") is False
    assert await store.get(alice, "resp_x") == b"alice's"
    await store.put(bob, "resp_x", b"bob's", ttl_s=60)  # same id, another tenant
    assert await store.get(alice, "resp_x") == b"alice's"
    assert await store.get(bob, "resp_x") == b"bob's"


async def test_sqlite_retention_by_its_clock(tmp_path: Path) -> None:
    clock = Clock()
    store = SqliteResponseStore(tmp_path / "r.sqlite3", clock=clock)
    try:
        await store.put("t", "resp_1", b"x", ttl_s=30)
        clock.now += 29
        assert await store.get("t", "resp_1") == b"x"
        clock.now += 1
        assert await store.get("t", "resp_1") is None
        assert await store.delete("t", "resp_1") is False
        clock.now += 3600  # the next write purges what expired
        await store.put("t", "resp_2", b"y", ttl_s=30)
    finally:
        await store.aclose()
    with closing(sqlite3.connect(tmp_path / "r.sqlite3")) as db:
        rows = db.execute("SELECT id FROM responses").fetchall()
    assert rows == [("resp_2",)]


async def test_sqlite_survives_a_restart_and_is_shared_on_a_host(tmp_path: Path) -> None:
    one, two = (
        SqliteResponseStore(tmp_path / "r.sqlite3"),
        SqliteResponseStore(tmp_path / "r.sqlite3"),
    )
    try:
        await one.put("t", "resp_1", b"kept", ttl_s=60)
        assert await two.get("t", "resp_1") == b"kept"
    finally:
        await one.aclose()
        await two.aclose()
    again = SqliteResponseStore(tmp_path / "r.sqlite3")
    try:
        assert await again.get("t", "resp_1") == b"kept"
    finally:
        await again.aclose()


async def test_redis_keeps_a_record_ttl_s(redis_url: str) -> None:
    store = RedisResponseStore(redis_url)
    tenant = f"key:{time.monotonic_ns()}"
    try:
        await store.put(tenant, "resp_1", b"x", ttl_s=2_592_000)
        with redis.Redis.from_url(redis_url) as client:
            ttl = client.ttl(RedisResponseStore.key(tenant, "resp_1"))
        assert 2_592_000 - 5 <= ttl <= 2_592_000
        await store.put(tenant, "resp_2", b"x", ttl_s=1)
        deadline = time.monotonic() + 10
        while await store.get(tenant, "resp_2") is not None:  # Redis expires it
            assert time.monotonic() < deadline, "not expired after 10 s"
            await asyncio.sleep(0.05)
    finally:
        await store.aclose()


async def test_an_unreachable_store_is_a_503(tmp_path: Path) -> None:
    with dead_port() as port:  # nothing listens there, nor can while the test runs
        down = RedisResponseStore(f"redis://127.0.0.1:{port}/0", timeout_s=0.2)
        blocked = tmp_path / "file"
        blocked.write_text("")
        unwritable = SqliteResponseStore(blocked / "r.sqlite3")  # its directory is a file
        for store in (down, unwritable):
            try:
                with pytest.raises(ResponsesUnavailable) as caught:
                    await store.get("t", "resp_1")
                status, body, headers = render(caught.value, "req-1")
                assert status == 503
                assert body["error"]["code"] == "responses_unavailable"
                assert int(headers["retry-after"]) > 0
            finally:
                await store.aclose()


def test_made_from_settings(tmp_path: Path, redis_url: str) -> None:
    assert isinstance(make_response_store(redis_url, tmp_path / "x", 0.5), RedisResponseStore)
    sqlite = make_response_store(None, tmp_path / "x.sqlite3", 0.5)
    assert isinstance(sqlite, SqliteResponseStore)
    assert not (tmp_path / "x.sqlite3").exists()  # opened on first use, not when made


def capped(kind: str, tmp_path: Path, redis_url: str, records: int, size: int) -> ResponseStore:
    if kind == "sqlite":
        return SqliteResponseStore(tmp_path / "r.sqlite3", max_records=records, max_bytes=size)
    return RedisResponseStore(redis_url, max_records=records, max_bytes=size)


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_a_tenant_past_its_caps_loses_its_oldest_across_gateways(
    kind: str, tmp_path: Path, redis_url: str
) -> None:
    """Two gateways' stores on one Redis or SQLite file count a tenant's records together:
    past ``max_records`` (or ``max_bytes``) the oldest go, the newest and other tenants'
    stay. Without the cap a tenant filled the store without end."""
    one = capped(kind, tmp_path, redis_url, records=3, size=1000)
    two = capped(kind, tmp_path, redis_url, records=3, size=1000)
    tenant, other = f"key:a{time.monotonic_ns()}", f"key:b{time.monotonic_ns()}"
    try:
        await one.put(other, "resp_o", b"theirs", ttl_s=60)
        evicted = []
        for n in range(5):  # alternate gateways, in order of age
            evicted.append(await (one, two)[n % 2].put(tenant, f"resp_{n}", b"x" * 10, ttl_s=60))
            await asyncio.sleep(0.002)  # each expires later than the one before
        assert evicted == [0, 0, 0, 1, 1]
        found = [n for n in range(5) if await two.get(tenant, f"resp_{n}") is not None]
        assert found == [2, 3, 4]
        assert await one.get(other, "resp_o") == b"theirs"
        await two.put(tenant, "resp_4", b"y" * 10, ttl_s=60)  # a rewrite is not one more
        assert await one.get(tenant, "resp_2") is not None
        assert await one.delete(tenant, "resp_2")  # room again: nothing evicted for resp_5
        assert await two.put(tenant, "resp_5", b"x" * 10, ttl_s=60) == 0
        assert await one.get(tenant, "resp_3") is not None
        big = await one.put(tenant, "resp_big", b"z" * 995, ttl_s=60)  # past max_bytes
        assert big == 3  # all the others went; the newest is kept whatever its size
        assert await two.get(tenant, "resp_big") == b"z" * 995
        assert await two.get(tenant, "resp_5") is None
        assert await one.get(other, "resp_o") == b"theirs"
    finally:
        await one.aclose()
        await two.aclose()


async def test_sqlite_expired_records_do_not_count(tmp_path: Path) -> None:
    clock = Clock()
    store = SqliteResponseStore(tmp_path / "r.sqlite3", clock=clock, max_records=2)
    try:
        await store.put("t", "resp_1", b"x", ttl_s=30)
        await store.put("t", "resp_2", b"x", ttl_s=60)
        clock.now += 45  # resp_1 has expired: resp_3 takes its place, resp_2 stays
        assert await store.put("t", "resp_3", b"x", ttl_s=60) == 0
        assert await store.get("t", "resp_2") == b"x"
    finally:
        await store.aclose()
