"""Concurrent searches batched into one FAISS call, and the GPU path's choices (tested
with a stand-in for faiss-gpu's three functions: no GPU here)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import faiss as real_faiss
import numpy as np
import pytest

from retrieval import index as index_module
from retrieval.batcher import SearchBatcher
from retrieval.index import Gpus, IndexParams, Kind, VectorIndex
from retrieval.service import Document, Retrieval
from tests.fakes.embedder import DIM, embed, split
from tests.unit.test_retrieval import clustered


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
async def test_batched_results_are_those_of_one_by_one(kind: Kind) -> None:
    index = VectorIndex(DIM, IndexParams(kind, ivf_nlist=16))
    data = clustered(4000, DIM, seed=7)
    index.add(list(range(len(data))), data)
    index.remove(list(range(0, 4000, 9)))  # HNSW: tombstones filtered per row
    queries = clustered(48, DIM, seed=8)
    ks = [1 + n % 20 for n in range(len(queries))]
    batcher = SearchBatcher(index.search, window_s=0.001, max_batch=16)
    batched = await asyncio.gather(
        *(batcher.search(q, k) for q, k in zip(queries, ks, strict=True))
    )
    assert batcher.batches == 3  # 48 queries, 16 a batch: three FAISS calls
    for query, k, (scores, ids) in zip(queries, ks, batched, strict=True):
        alone_scores, alone_ids = index.search(query.reshape(1, -1), k)
        assert ids.tolist() == alone_ids.tolist()
        # the batched kernel may round the last bit of a float32 score differently
        np.testing.assert_allclose(scores, alone_scores, rtol=0, atol=1e-6)


@pytest.mark.anyio
async def test_a_failed_batch_fails_each_caller_and_a_cancelled_caller_leaves_the_rest() -> None:
    calls: list[int] = []

    def search(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        calls.append(len(vectors))
        if len(calls) == 1:
            raise RuntimeError("index broke")
        return np.zeros((len(vectors), k), np.float32), np.tile(np.arange(k), (len(vectors), 1))

    batcher = SearchBatcher(search, window_s=0.01)
    one = np.ones(4, np.float32)
    results = await asyncio.gather(*(batcher.search(one, 2) for _ in range(3)),
                                   return_exceptions=True)  # fmt: skip
    assert [type(r) for r in results] == [RuntimeError] * 3
    left = asyncio.ensure_future(batcher.search(one, 2))
    stays = asyncio.ensure_future(batcher.search(one, 3))
    await asyncio.sleep(0)
    left.cancel()
    _, ids = await stays
    assert ids.tolist() == [[0, 1, 2]]
    assert calls == [3, 1]  # the cancelled query never reached FAISS


@pytest.mark.anyio
async def test_concurrent_searches_through_the_service_match_sequential_ones(
    tmp_path: Path,
) -> None:
    service = Retrieval(tmp_path, embed, split, DIM)
    service.open(follow=False)
    await service.create_collection("t", "c")
    await service.upsert("t", "c", [Document(f"passage {n}", f"p{n}", {"n": n % 3})
                                    for n in range(200)])  # fmt: skip
    asks = [(f"passage {n}", 1 + n % 7, {"n": n % 3} if n % 2 else None) for n in range(40)]
    together = await asyncio.gather(*(service.search("t", "c", q, k, where=w) for q, k, w in asks))
    assert service._batchers[("t", "c")].batches < len(asks)
    for (query, k, where), hits in zip(asks, together, strict=True):
        alone = await service.search("t", "c", query, k, where=where)
        assert [h.id for h in hits] == [h.id for h in alone]
        assert hits[0].document_id == query.replace("passage ", "p")
    await service.close()


class StandInGpuFaiss:
    """faiss-gpu's ``get_num_gpus``, ``StandardGpuResources`` and ``index_cpu_to_gpu`` on
    top of faiss-cpu: a "GPU copy" is the CPU index, tagged with its device. What FAISS
    cannot clone to a GPU (HNSW) raises RuntimeError, as faiss-gpu does."""

    def __init__(self, gpus: int) -> None:
        self.gpus = gpus
        self.resources: list[object] = []
        self.copies: list[tuple[object, int]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(real_faiss, name)

    def get_num_gpus(self) -> int:
        return self.gpus

    def StandardGpuResources(self) -> object:
        made = object()
        self.resources.append(made)
        return made

    def index_cpu_to_gpu(self, resources: object, device: int, index: Any) -> Any:
        inner = real_faiss.downcast_index(index.index)
        if isinstance(inner, real_faiss.IndexHNSW):
            raise RuntimeError("not implemented for this type of index")
        self.copies.append((resources, device))
        return index


def test_indexes_go_to_the_gpus_in_turn_and_hnsw_stays_on_the_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stand_in = StandInGpuFaiss(gpus=2)
    monkeypatch.setattr(index_module, "faiss", stand_in)
    monkeypatch.setattr(index_module, "GPUS", Gpus())
    data = clustered(300, DIM, seed=9)
    flats = [VectorIndex(DIM, IndexParams("flat")) for _ in range(3)]
    for flat in flats:
        flat.add(list(range(300)), data)
        _, ids = flat.search(data[:1], 1)
        assert ids[0][0] == 0
    assert [device for _, device in stand_in.copies] == [0, 1, 0]
    assert len(stand_in.resources) == 2  # one per device, kept
    assert stand_in.copies[0][0] is stand_in.copies[2][0]
    flats[0].search(data[:1], 1)
    assert len(stand_in.copies) == 3  # the GPU copy is reused until a write
    flats[0].add([300], data[:1])
    flats[0].search(data[:1], 1)
    assert len(stand_in.copies) == 4
    hnsw = VectorIndex(DIM, IndexParams("hnsw"))
    hnsw.add(list(range(300)), data)
    _, ids = hnsw.search(data[5:6], 1)
    assert ids[0][0] == 5  # searched on the CPU
    assert index_module.GPUS.unsupported == {"IndexIDMap2"}


def test_no_gpu_means_the_cpu_index(monkeypatch: pytest.MonkeyPatch) -> None:
    stand_in = StandInGpuFaiss(gpus=0)
    monkeypatch.setattr(index_module, "faiss", stand_in)
    monkeypatch.setattr(index_module, "GPUS", Gpus())
    flat = VectorIndex(DIM, IndexParams("flat"))
    flat.add([1], clustered(1, DIM, seed=1))
    flat.search(clustered(1, DIM, seed=1), 1)
    assert stand_in.copies == []
    assert stand_in.resources == []
    assert Gpus().count() == 0
