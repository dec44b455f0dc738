"""Collections of documents, per tenant: write to the docstore, keep the index in step.

Writes go to the docstore first (acknowledged only after the commit); with ``strong``
consistency the index is updated before the call returns, with ``eventual`` it catches
up in the background (a search may miss a write for a moment). On start every
collection's index is loaded from its snapshot and the docstore's ops after it are
replayed; snapshots are written every ``snapshot_every`` ops and on close.

A collection belongs to one tenant; another tenant's is simply not found.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import shutil
import threading
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from retrieval.docstore import Change, DocStore
from retrieval.errors import (
    CollectionExists,
    CollectionNotFound,
    DocumentNotFound,
    InvalidName,
    RetrievalError,
)
from retrieval.index import IndexParams, VectorIndex

Embed = Callable[[list[str]], Awaitable[list[list[float]]]]
Split = Callable[[str], list[str]]
Consistency = Literal["strong", "eventual"]
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Document:
    text: str
    id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Hit:
    id: int  # the chunk
    document_id: str
    score: float
    text: str
    metadata: dict[str, Any]


class Retrieval:
    def __init__(
        self,
        root: Path,
        embed: Embed,
        split: Split,
        dim: int | None = None,
        *,
        params: IndexParams | None = None,
        consistency: Consistency = "strong",
        snapshot_every: int = 1000,
        database: str | None = None,
    ) -> None:
        """``database``: a ``postgresql://`` URL shared with other processes; None keeps
        the docstore in SQLite under ``root``."""
        self.root = root
        self.embed = embed
        self.split = split
        self.dim = dim  # None: learnt from the first embedding
        self.params = params or IndexParams()
        self.consistency = consistency
        self.snapshot_every = snapshot_every
        self.docstore = DocStore(database or root / "docstore.sqlite3")
        self._indexes: dict[tuple[str, str], VectorIndex] = {}
        self._since_snapshot: dict[tuple[str, str], int] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._catching_up: dict[tuple[str, str], threading.Lock] = {}
        self._pending: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"Retrieval(root={str(self.root)!r}, kind={self.params.kind!r})"

    # lifecycle
    def open(self) -> None:
        """Load every index: snapshot plus the docstore's ops after it (or a full rebuild)."""
        for tenant, name, dim in self.docstore.collections():
            self._indexes[(tenant, name)] = self._recover(tenant, name, dim)

    def _recover(self, tenant: str, name: str, dim: int) -> VectorIndex:
        index = VectorIndex.load(self._dir(tenant, name), self.params) or VectorIndex(
            dim, self.params
        )
        _apply(index, self.docstore.changes_since(tenant, name, index.seq))
        return index

    async def close(self) -> None:
        await self.drain()
        for (tenant, name), index in self._indexes.items():
            await asyncio.to_thread(index.save, self._dir(tenant, name))
        self.docstore.close()

    async def drain(self) -> None:
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    # collections
    async def create_collection(self, tenant: str, name: str) -> None:
        if not NAME.match(name):
            raise InvalidName(f"collection name must match {NAME.pattern}")
        if self.dim is None:  # ask the embedding model once
            self.dim = len((await self.embed(["dimension probe"]))[0])
        if not self.docstore.create_collection(tenant, name, self.dim):
            raise CollectionExists(f"collection {name} exists")
        self._indexes[(tenant, name)] = VectorIndex(self.dim, self.params)

    def list_collections(self, tenant: str) -> list[dict[str, Any]]:
        return [
            {"name": name, "documents": self.docstore.document_count(tenant, name),
             "chunks": self._index(tenant, name).size}
            for _, name, _ in self.docstore.collections(tenant)
        ]  # fmt: skip

    def delete_collection(self, tenant: str, name: str) -> None:
        self._index(tenant, name)
        self.docstore.drop_collection(tenant, name)
        self._indexes.pop((tenant, name), None)
        shutil.rmtree(self._dir(tenant, name), ignore_errors=True)

    # documents
    async def upsert(self, tenant: str, name: str, documents: Sequence[Document]) -> list[str]:
        """Chunk, embed and store each document; its id is returned once it is durable."""
        self._index(tenant, name)
        pieces = [self.split(d.text) or [d.text] for d in documents]
        flat = [p for chunks in pieces for p in chunks]
        vectors = await self.embed(flat) if flat else []
        if len(vectors) != len(flat):
            raise RetrievalError(f"embedding returned {len(vectors)} vectors for {len(flat)}")
        ids = []
        at = 0
        async with self._lock(tenant, name):
            for document, chunks in zip(documents, pieces, strict=True):
                doc_id = document.id or uuid.uuid4().hex
                pairs = [
                    (text, np.asarray(vectors[at + n], dtype=np.float32))
                    for n, text in enumerate(chunks)
                ]
                at += len(chunks)
                change = await asyncio.to_thread(
                    self.docstore.put_document, tenant, name, doc_id, document.text,
                    document.metadata, pairs,
                )  # fmt: skip
                await self._follow(tenant, name, change)
                ids.append(doc_id)
        return ids

    async def delete_document(self, tenant: str, name: str, doc_id: str) -> None:
        self._index(tenant, name)
        async with self._lock(tenant, name):
            change = await asyncio.to_thread(self.docstore.delete_document, tenant, name, doc_id)
            if change is None:
                raise DocumentNotFound(f"no document {doc_id} in {name}")
            await self._follow(tenant, name, change)

    async def search(
        self,
        tenant: str,
        name: str,
        query: str,
        top_k: int = 4,
        min_score: float | None = None,
        where: dict[str, Any] | None = None,
    ) -> list[Hit]:
        index = self._index(tenant, name)
        vector = (await self.embed([query]))[0]
        return await asyncio.to_thread(self._search, index, vector, top_k, min_score, where)

    def _search(
        self,
        index: VectorIndex,
        vector: Sequence[float],
        top_k: int,
        min_score: float | None,
        where: dict[str, Any] | None,
    ) -> list[Hit]:
        fetch = top_k * 4 if where else top_k
        scores, ids = index.search(np.asarray([vector], dtype=np.float32), fetch)
        found = [(float(s), int(i)) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0]
        chunks = self.docstore.chunks([i for _, i in found])
        hits = []
        for score, chunk_id in found:
            chunk = chunks.get(chunk_id)
            if chunk is None or (min_score is not None and score < min_score):
                continue
            if where and any(chunk.metadata.get(k) != v for k, v in where.items()):
                continue
            hits.append(Hit(chunk_id, chunk.doc_id, score, chunk.text, chunk.metadata))
            if len(hits) == top_k:
                break
        return hits

    # internals
    def _index(self, tenant: str, name: str) -> VectorIndex:
        index = self._indexes.get((tenant, name))
        if index is None:
            raise CollectionNotFound(f"no collection {name}")
        return index

    def _lock(self, tenant: str, name: str) -> asyncio.Lock:
        return self._locks.setdefault((tenant, name), asyncio.Lock())

    def _dir(self, tenant: str, name: str) -> Path:
        digest = hashlib.sha256(tenant.encode()).hexdigest()[:16]
        return self.root / "indexes" / digest / name

    async def _follow(self, tenant: str, name: str, change: Change) -> None:
        if self.consistency == "strong":
            await asyncio.to_thread(self._catch_up, tenant, name)
        else:
            task = asyncio.get_running_loop().create_task(
                asyncio.to_thread(self._catch_up, tenant, name)
            )
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    def _catch_up(self, tenant: str, name: str) -> None:
        """Apply the docstore's new ops to the collection's index; one at a time, so an op
        is never applied twice and a rebuild never races an update."""
        key = (tenant, name)
        with self._catching_up.setdefault(key, threading.Lock()):
            index = self._indexes.get(key)
            if index is None:
                return  # the collection was deleted meanwhile
            _apply(index, self.docstore.changes_since(tenant, name, index.seq))
            if len(index.tombstones) > max(64, index.size // 4):
                index = self._rebuild(tenant, name, index.dim)  # HNSW: drop the tombstones
            self._since_snapshot[key] = self._since_snapshot.get(key, 0) + 1
            if self._since_snapshot[key] >= self.snapshot_every:
                index.save(self._dir(tenant, name))
                self._since_snapshot[key] = 0

    def _rebuild(self, tenant: str, name: str, dim: int) -> VectorIndex:
        """A new index from the docstore alone (removed chunks simply are not there)."""
        fresh = VectorIndex(dim, self.params)
        _apply(fresh, self.docstore.changes_since(tenant, name, 0))
        self._indexes[(tenant, name)] = fresh
        fresh.save(self._dir(tenant, name))
        return fresh


def _apply(index: VectorIndex, change: Change) -> None:
    if change.seq <= index.seq:
        return
    index.remove(change.removed)
    if change.added:
        ids = [i for i, _ in change.added]
        index.add(ids, np.stack([v for _, v in change.added]))
    index.seq = change.seq
