"""Retrieval: recall of the approximate indexes, durability under SIGKILL, tenants, chunking."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tokenizers

from models.config import StoreConfig
from models.store import ModelStore
from retrieval.chunking import split as token_split
from retrieval.errors import CollectionNotFound
from retrieval.index import IndexParams, Kind, VectorIndex
from retrieval.service import Document, Retrieval
from tests.fakes.embedder import DIM, embed, split, vector
from tests.retrieval_db import fresh_database


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    """Points around 200 centres: how real embeddings sit, unlike uniform noise."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((200, dim)).astype(np.float32)
    labels = rng.integers(0, 200, n)
    return (centres[labels] + 0.6 * rng.standard_normal((n, dim))).astype(np.float32)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_recall_at_10_against_exact_search(kind: Kind) -> None:
    data = clustered(20_000, DIM, seed=1)
    queries = clustered(200, DIM, seed=2)
    ids = list(range(len(data)))
    exact = VectorIndex(DIM, IndexParams("flat"))
    exact.add(ids, data)
    approx = VectorIndex(DIM, IndexParams(kind))  # the default settings
    approx.add(ids, data)
    _, truth = exact.search(queries, 10)
    _, found = approx.search(queries, 10)
    recall = np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found, strict=True)])
    print(f"\n{kind} recall@10 = {recall:.3f}")
    assert recall >= 0.95


def test_removal_and_snapshots(tmp_path: Path) -> None:
    kinds: list[Kind] = ["flat", "hnsw", "ivf"]
    for kind in kinds:
        index = VectorIndex(DIM, IndexParams(kind, ivf_nlist=4))
        data = clustered(400, DIM, seed=3)
        index.add(list(range(400)), data)
        index.remove([0, 1, 2])
        index.seq = 42
        _, ids = index.search(data[:3], 5)
        assert not {0, 1, 2} & set(ids.ravel().tolist()), kind
        index.save(tmp_path / kind)
        again = VectorIndex.load(tmp_path / kind, IndexParams(kind, ivf_nlist=4))
        assert again is not None
        assert (again.seq, again.size) == (42, 397)
        _, ids = again.search(data[3:4], 1)
        assert ids[0][0] == 3
    assert VectorIndex.load(tmp_path / "flat", IndexParams("hnsw")) is None  # config changed


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """The docstore's database: SQLite under the test's directory, or PostgreSQL."""
    if request.param == "sqlite":
        yield None
        return
    with fresh_database(request.getfixturevalue("postgres_url")) as url:
        yield url


@pytest.mark.anyio
async def test_documents_search_update_delete(tmp_path: Path, database: str | None) -> None:
    service = Retrieval(tmp_path, embed, split, DIM, database=database)
    service.open()
    await service.create_collection("t1", "docs")
    first = await service.upsert("t1", "docs", [
        Document("The access code for the blue door is 7731.", "door", {"kind": "fact"}),
        Document("Bananas are yellow.\n\nApples are red.", None, {"kind": "fruit"}),
    ])  # fmt: skip
    assert first[0] == "door"
    hits = await service.search("t1", "docs", "The access code for the blue door is 7731.")
    assert hits[0].document_id == "door"
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    fruit = await service.search("t1", "docs", "Apples are red.", where={"kind": "fruit"})
    assert [h.document_id for h in fruit] == [first[1], first[1]]  # two chunks of one doc
    assert await service.search("t1", "docs", "Apples are red.", min_score=0.99, top_k=1)
    await service.upsert("t1", "docs", [Document("The code changed to 1234.", "door")])
    hits = await service.search("t1", "docs", "The access code for the blue door is 7731.")
    assert all("7731" not in h.text for h in hits)  # the old chunk left with the update
    await service.delete_document("t1", "docs", "door")
    hits = await service.search("t1", "docs", "The code changed to 1234.", top_k=10)
    assert all(h.document_id != "door" for h in hits)
    await service.close()


@pytest.mark.anyio
async def test_tenants_never_see_each_other(tmp_path: Path, database: str | None) -> None:
    service = Retrieval(tmp_path, embed, split, DIM, database=database)
    service.open()
    for tenant in ("a", "b"):
        await service.create_collection(tenant, "shared-name")
        await service.upsert(tenant, "shared-name", [Document(f"secret of {tenant}", tenant)])
    await service.create_collection("a", "only-a")
    hits = await service.search("b", "shared-name", "secret of a", top_k=10)
    assert [h.document_id for h in hits] == ["b"]
    with pytest.raises(CollectionNotFound):
        await service.search("b", "only-a", "anything")
    assert [c["name"] for c in service.list_collections("b")] == ["shared-name"]
    await service.close()


@pytest.mark.anyio
async def test_searches_run_while_documents_arrive(tmp_path: Path) -> None:
    service = Retrieval(tmp_path, embed, split, DIM, consistency="eventual")
    service.open()
    await service.create_collection("t", "c")

    writes_done = asyncio.Event()

    async def writer() -> None:
        for n in range(60):
            await service.upsert("t", "c", [Document(f"note {n}", f"n{n}")])
        writes_done.set()

    async def reader() -> int:
        during = 0  # searches answered while the writes went on
        for _ in range(60):
            await service.search("t", "c", "note 3", top_k=3)  # eventual: may find none yet
            during += not writes_done.is_set()
            await asyncio.sleep(0)
        return during

    _, during = await asyncio.gather(writer(), reader())
    assert during > 0  # searches were answered between writes, not after them all
    await service.drain()  # eventual: the index catches up
    hits = await service.search("t", "c", "note 59", top_k=1)
    assert hits[0].document_id == "n59"
    assert service.list_collections("t")[0]["chunks"] == 60
    await service.close()


def read_acks(output: str) -> tuple[set[str], set[str], set[str]]:
    """Acknowledged writes, acknowledged deletes, and a delete cut off by the kill."""
    acked, deleted, unsure = set(), set(), set()
    for line in output.splitlines():
        kind, _, doc = line.partition(" ")
        if kind == "ACK":
            acked.add(doc)
        elif kind == "DELETING":
            unsure.add(doc)
        elif kind == "DEL":
            unsure.discard(doc)
            deleted.add(doc)
    return acked, deleted, unsure


def crash_and_check(tmp_path: Path, database: str | None) -> None:
    """Ingest in a worker killed with SIGKILL at random moments, twelve times; then every
    acknowledged write is found and no acknowledged delete comes back."""
    rng = random.Random(5)
    acked: set[str] = set()
    deleted: set[str] = set()
    unsure: set[str] = set()
    start = 0
    kills = 0
    env = {**os.environ, "PYTHONPATH": str(Path.cwd())}
    extra = [database] if database else []
    for _ in range(12):
        worker = subprocess.Popen(
            [sys.executable, "-m", "tests.retrieval_crash_worker", str(tmp_path), str(start),
             "100000", *extra],
            stdout=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        time.sleep(rng.uniform(0.8, 2.0))  # interpreter start, then ingest under way
        worker.send_signal(signal.SIGKILL)
        output, _ = worker.communicate()
        kills += worker.returncode == -signal.SIGKILL
        new_acked, new_deleted, new_unsure = read_acks(output)
        acked |= new_acked
        deleted |= new_deleted
        unsure |= new_unsure
        start += 100_000
    assert kills >= 10

    async def check() -> tuple[list[str], list[str]]:
        service = Retrieval(tmp_path, embed, split, DIM, snapshot_every=7, database=database)
        service.open()
        index = service._index("t", "docs")
        missing, resurrected = [], []
        for doc in sorted(acked - deleted - unsure):
            n = int(doc.split("-")[1])
            _, ids = index.search(np.asarray([vector(f"text of document {n}")]), 1)
            chunk = service.docstore.chunks([int(ids[0][0])]).get(int(ids[0][0]))
            if chunk is None or chunk.doc_id != doc:
                missing.append(doc)
        for doc in sorted(deleted):
            n = int(doc.split("-")[1])
            hits = await service.search("t", "docs", f"text of document {n}", top_k=3)
            if any(h.document_id == doc for h in hits):
                resurrected.append(doc)
        await service.close()  # its follower too, before the database is dropped
        return missing, resurrected

    missing, resurrected = asyncio.run(check())
    print(f"\n{kills} kills, {len(acked)} acknowledged, {len(deleted)} deleted")
    assert len(acked) > 100
    assert missing == []
    assert resurrected == []


def test_every_acknowledged_write_survives_sigkill(tmp_path: Path) -> None:
    crash_and_check(tmp_path, None)


def test_every_acknowledged_write_survives_sigkill_with_postgresql(
    tmp_path: Path, postgres_url: str
) -> None:
    with fresh_database(postgres_url) as database:
        crash_and_check(tmp_path, database)


def test_chunks_follow_tokens_with_overlap() -> None:
    entry = ModelStore(StoreConfig().root).resolve("all-minilm-l6-v2")
    tokenizer = tokenizers.Tokenizer.from_file(str(entry / "tokenizer.json"))
    text = " ".join(f"word{n}" for n in range(300))
    chunks = token_split(text, tokenizer, size=64, overlap=16)
    assert len(chunks) > 3
    for chunk in chunks:
        assert len(tokenizer.encode(chunk, add_special_tokens=False).ids) <= 64
    assert chunks[0].split()[-1] in chunks[1]  # neighbours share their overlap
    assert chunks[-1].endswith("word299")


@pytest.mark.anyio
async def test_hnsw_tombstones_are_compacted_by_a_rebuild(tmp_path: Path) -> None:
    service = Retrieval(tmp_path, embed, split, DIM, params=IndexParams("hnsw"))
    service.open()
    await service.create_collection("t", "c")
    await service.upsert("t", "c", [Document(f"entry {n}", f"e{n}") for n in range(300)])
    for n in range(100):
        await service.delete_document("t", "c", f"e{n}")
    index = service._index("t", "c")
    assert len(index.tombstones) <= max(64, index.size // 4)  # rebuilt along the way
    assert index.size == 200
    hits = await service.search("t", "c", "entry 150", top_k=1)
    assert hits[0].document_id == "e150"
    assert not await service.search("t", "c", "entry 5", min_score=0.99)
    await service.close()
