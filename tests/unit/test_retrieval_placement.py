"""Shard placement by rendezvous hashing, and the index-worker settings."""

from __future__ import annotations

import pytest
from pydantic import SecretStr, ValidationError

from retrieval.docstore import shard_of
from retrieval.worker import ShardKey, rendezvous
from serving.settings import RetrievalConfig


def test_a_leaving_worker_moves_only_its_own_shards_spread_over_the_rest() -> None:
    keys = [ShardKey("t", f"c{n}", s) for n in range(40) for s in range(4)]
    workers = ["w0", "w1", "w2", "w3"]
    before = {key: rendezvous(key, workers) for key in keys}
    assert len(set(before.values())) == 4
    after = {key: rendezvous(key, ["w0", "w1", "w3"]) for key in keys}
    moved = {key for key in keys if before[key] != after[key]}
    assert moved == {key for key in keys if before[key] == "w2"}
    assert len({after[key] for key in moved}) == 3  # spread, not all onto one


def test_documents_spread_over_shards_by_id_stably() -> None:
    placed = [shard_of(f"doc-{n}", 4) for n in range(400)]
    assert placed == [shard_of(f"doc-{n}", 4) for n in range(400)]
    assert all(60 < placed.count(s) < 140 for s in range(4))
    assert {shard_of(f"doc-{n}", 1) for n in range(50)} == {0}


def test_index_workers_need_the_shared_database() -> None:
    with pytest.raises(ValidationError, match="database_url"):
        RetrievalConfig(index_workers=True)
    config = RetrievalConfig(index_workers=True, database_url=SecretStr("postgresql://x/y"))
    assert config.index_workers
