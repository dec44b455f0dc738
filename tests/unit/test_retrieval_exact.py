"""Flat scoring through numpy (``retrieval.exact``) gives FAISS's answers: the same ids
in the same order, scores to the last bits, -1 past the end, across block edges."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from retrieval import exact
from retrieval.index import VectorIndex, normalise


def faiss_top_k(
    stored: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(stored.shape[1]))
    if len(stored):
        index.add_with_ids(stored, ids)
    scores, found = index.search(queries, k)
    return scores, found


@pytest.mark.parametrize(("count", "k", "block_rows", "group"), [
    (0, 5, 65_536, 512),  # empty: all -1
    (3, 10, 65_536, 512),  # fewer stored than k
    (5_000, 10, 65_536, 512),  # one block, a ragged last group
    (5_000, 50, 1_024, 64),  # several blocks, the last one short
    (5_000, 1, 777, 100),  # k = 1, odd sizes
    (600, 40, 256, 16),  # fewer groups than k in the last block
])  # fmt: skip
def test_the_same_ids_and_scores_as_faiss(
    count: int, k: int, block_rows: int, group: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(exact, "BLOCK_BYTES", block_rows * 4 * 7)
    monkeypatch.setattr(exact, "GROUP", group)
    rng = np.random.default_rng(count + k)
    stored = normalise(rng.standard_normal((count, 32))) if count else np.empty((0, 32), np.float32)
    ids = rng.permutation(10 * count + 1)[:count].astype(np.int64)
    queries = normalise(rng.standard_normal((7, 32)))
    scores, found = exact.top_k(queries, stored, ids, k)
    want_scores, want_ids = faiss_top_k(stored, ids, queries, k)
    assert found.tolist() == want_ids.tolist()
    np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-6)
    assert scores.dtype == np.float32
    assert found.dtype == np.int64


def test_ties_go_to_the_earlier_vector_and_duplicates_all_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(exact, "BLOCK_BYTES", 64 * 4)
    monkeypatch.setattr(exact, "GROUP", 8)
    stored = np.zeros((200, 4), dtype=np.float32)
    stored[:, 0] = 1.0  # every vector the same: every score ties
    ids = np.arange(1000, 1200, dtype=np.int64)
    scores, found = exact.top_k(np.array([[1, 0, 0, 0]], dtype=np.float32), stored, ids, 12)
    assert found.tolist() == [list(range(1000, 1012))]
    assert scores.tolist() == [[1.0] * 12]


def test_a_flat_index_on_the_cpu_scores_through_numpy_and_others_through_faiss() -> None:
    rng = np.random.default_rng(3)
    data = rng.standard_normal((500, 16))
    flat = VectorIndex(16)
    flat.add(list(range(500)), data)
    flat.remove(list(range(0, 500, 3)))  # FAISS compacts its arrays: the ids follow
    queries = rng.standard_normal((4, 16))
    flat.search(queries, 5)
    assert flat._flat_on_cpu() is not None
    kept = [n for n in range(500) if n % 3]
    _, want = faiss_top_k(normalise(data[kept]), np.array(kept), normalise(queries), 5)
    assert flat.search(queries, 5)[1].tolist() == want.tolist()
