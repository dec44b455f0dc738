"""Index replicas following the docstore's log: two services (two gateways' worth) on one
PostgreSQL, and two on one SQLite file (``weir serve --workers``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from retrieval.errors import CollectionNotFound
from retrieval.service import Consistency, Document, Retrieval
from tests.fakes.embedder import DIM, embed, split
from tests.retrieval_db import fresh_database


@asynccontextmanager
async def replica(
    root: Path,
    database: str | None,
    consistency: Consistency,
    *,
    follow: bool = True,
    interval_s: float = 0.25,
) -> AsyncIterator[Retrieval]:
    service = Retrieval(root, embed, split, DIM, consistency=consistency, database=database,
                        follow_interval_s=interval_s)  # fmt: skip
    await asyncio.to_thread(service.open, follow=follow)
    try:
        yield service
    finally:
        await service.close()


async def seen_after(service: Retrieval, text: str, doc_id: str, deadline_s: float = 30) -> float:
    """Seconds until a search through ``service`` finds ``doc_id`` (polled every 2 ms)."""
    started = time.monotonic()
    while time.monotonic() - started < deadline_s:
        try:
            hits = await service.search("t", "c", text, top_k=1)
        except CollectionNotFound:
            hits = []
        if hits and hits[0].document_id == doc_id:
            return time.monotonic() - started
        await asyncio.sleep(0.002)
    raise AssertionError(f"{doc_id} not found within {deadline_s} s")


@pytest.mark.anyio
async def test_a_write_through_one_gateway_is_found_through_the_other(
    tmp_path: Path, postgres_url: str
) -> None:
    with fresh_database(postgres_url) as url:
        # a 60 s poll: what wakes the follower within the wait below is PostgreSQL's NOTIFY
        async with (
            replica(tmp_path / "a", url, "eventual", interval_s=60) as a,
            replica(tmp_path / "b", url, "eventual", interval_s=60) as b,
            replica(tmp_path / "c", url, "strong", follow=False) as c,
        ):
            await a.create_collection("t", "c")
            lags = []
            for n in range(20):
                await a.upsert("t", "c", [Document(f"fact number {n}", f"f{n}")])
                lags.append(await seen_after(b, f"fact number {n}", f"f{n}"))
            lags.sort()
            print(f"\nreplica lag over NOTIFY: p50 {lags[10] * 1000:.1f} ms,"
                  f" max {lags[-1] * 1000:.1f} ms")  # fmt: skip
            # strong, with no follower at all: the search catches up to the head first
            await b.upsert("t", "c", [Document("written through b", "from-b")])
            hits = await c.search("t", "c", "written through b", top_k=1)
            assert hits[0].document_id == "from-b"
            await a.delete_document("t", "c", "from-b")
            hits = await c.search("t", "c", "written through b", top_k=3)
            assert "from-b" not in [h.document_id for h in hits]
            assert c.list_collections("t")[0]["chunks"] == 20
            # a collection dropped and made anew elsewhere: the old index is not reused
            a.delete_collection("t", "c")
            with pytest.raises(CollectionNotFound):
                await c.search("t", "c", "fact number 1")
            await a.create_collection("t", "c")
            await a.upsert("t", "c", [Document("fresh start", "new")])
            hits = await c.search("t", "c", "fact number 1", top_k=5)
            assert [h.document_id for h in hits] == ["new"]
            await seen_after(b, "fresh start", "new")
            hits = await b.search("t", "c", "fact number 1", top_k=5)
            assert [h.document_id for h in hits] == ["new"]


@pytest.mark.anyio
async def test_workers_sharing_a_sqlite_docstore_follow_each_other(tmp_path: Path) -> None:
    async with (
        replica(tmp_path, None, "eventual", interval_s=0.05) as a,
        replica(tmp_path, None, "eventual", interval_s=0.05) as b,
    ):
        await a.create_collection("t", "c")
        await a.upsert("t", "c", [Document("shared file", "d1")])
        await seen_after(b, "shared file", "d1")
        await b.upsert("t", "c", [Document("the other way", "d2")])
        await seen_after(a, "the other way", "d2")


@pytest.mark.anyio
async def test_a_restarted_replica_loads_its_snapshot_and_the_log_after_it(
    tmp_path: Path, postgres_url: str
) -> None:
    with fresh_database(postgres_url) as url:
        async with replica(tmp_path / "a", url, "strong") as a:
            await a.create_collection("t", "c")
            await a.upsert("t", "c", [Document(f"early {n}", f"e{n}") for n in range(5)])
        # a's snapshot holds e0..e4; what b writes meanwhile is in the log only
        async with replica(tmp_path / "b", url, "strong") as b:
            await b.upsert("t", "c", [Document("late", "late")])
            await b.delete_document("t", "c", "e0")
        async with replica(tmp_path / "a", url, "eventual", follow=False) as again:
            index = again._index("t", "c")
            assert index.size == 5
            hits = await again.search("t", "c", "late", top_k=1)
            assert hits[0].document_id == "late"
            hits = await again.search("t", "c", "early 0", top_k=5)
            assert "e0" not in [h.document_id for h in hits]
