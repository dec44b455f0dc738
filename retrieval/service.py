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
import logging
import re
import shutil
import threading
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from retrieval.batcher import SearchBatcher
from retrieval.docstore import Change, CollectionInfo, DocStore
from retrieval.errors import (
    CollectionExists,
    CollectionNotFound,
    DocumentNotFound,
    InvalidName,
    RetrievalError,
)
from retrieval.index import IndexParams, VectorIndex
from retrieval.scatter import Scatter, ShardRouter
from retrieval.sql import Database

log = logging.getLogger("weir.retrieval")

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
        follow_interval_s: float = 0.25,
        batch_window_s: float = 0.001,
        max_batch: int = 64,
        scatter: Scatter | None = None,
    ) -> None:
        """``database``: a ``postgresql://`` URL shared with other processes; None keeps
        the docstore in SQLite under ``root``. ``follow_interval_s``: how often the
        replicas look for other processes' writes (PostgreSQL's NOTIFY wakes them at
        once; the interval bounds the lag when a notification is lost). Concurrent
        searches of a collection go to FAISS together: at most ``max_batch`` queries,
        gathered for at most ``batch_window_s`` (``retrieval.batcher``). With
        ``scatter`` this process holds no index: searches go to the index workers that
        hold the collections' shards (``retrieval.scatter``)."""
        self.root = root
        self.embed = embed
        self.split = split
        self.dim = dim  # None: learnt from the first embedding
        self.params = params or IndexParams()
        self.consistency = consistency
        self.snapshot_every = snapshot_every
        self.docstore = DocStore(database or root / "docstore.sqlite3")
        self.follower = Follower(self.sync, self.docstore.db, follow_interval_s)
        self._indexes: dict[tuple[str, str], VectorIndex] = {}
        self._since_snapshot: dict[tuple[str, str], int] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._catching_up: dict[tuple[str, str], threading.Lock] = {}
        self._pending: set[asyncio.Task[None]] = set()
        self.batch_window_s = batch_window_s
        self.max_batch = max_batch
        self._batchers: dict[tuple[str, str], SearchBatcher] = {}
        self.router = (
            None
            if scatter is None
            else ShardRouter(
                self.docstore,
                timeout_s=scatter.timeout_s,
                takeover_s=scatter.takeover_s,
                token=scatter.token,
            )
        )

    def __repr__(self) -> str:
        return f"Retrieval(root={str(self.root)!r}, kind={self.params.kind!r})"

    # lifecycle
    def open(self, *, follow: bool = True) -> None:
        """Load every index (snapshot plus the docstore's ops after it, or a full rebuild),
        then follow the log in a thread: what another process writes reaches this one's
        indexes within ``follow_interval_s`` (at once with NOTIFY)."""
        if self.router is not None:
            return  # the index workers hold the indexes
        self.sync()
        if follow:
            self.follower.start()

    async def close(self) -> None:
        await asyncio.to_thread(self.follower.stop)
        if self.router is not None:
            await self.router.close()
        await self.drain()
        for (tenant, name), index in list(self._indexes.items()):
            await asyncio.to_thread(index.save, self._dir(tenant, name))
        self.docstore.close()

    async def drain(self) -> None:
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    def sync(self) -> None:
        """Every collection's index brought up to the docstore's head: new collections
        loaded, dropped ones forgotten, the rest caught up (the follower's round)."""
        infos = {(i.tenant, i.name): i for i in self.docstore.infos()}
        for info in infos.values():
            self._sync_one(info)
        for key in list(self._indexes):
            if key not in infos:
                self._forget(key)

    # collections
    async def create_collection(self, tenant: str, name: str, shards: int = 1) -> None:
        if not NAME.match(name):
            raise InvalidName(f"collection name must match {NAME.pattern}")
        if self.dim is None:  # ask the embedding model once
            self.dim = len((await self.embed(["dimension probe"]))[0])
        made = await asyncio.to_thread(
            self.docstore.create_collection, tenant, name, self.dim, shards
        )
        if not made:
            raise CollectionExists(f"collection {name} exists")
        info = await asyncio.to_thread(self.docstore.info, tenant, name)
        if info is not None and self.router is None:
            await asyncio.to_thread(self._sync_one, info)

    def list_collections(self, tenant: str) -> list[dict[str, Any]]:
        listed = []
        for info in self.docstore.infos(tenant):
            index = self._indexes.get((tenant, info.name))
            if index is not None:
                chunks = index.size
            else:
                chunks = self.docstore.chunk_count(tenant, info.name) if self.router else 0
            listed.append({"name": info.name, "shards": info.shards,
                           "documents": self.docstore.document_count(tenant, info.name),
                           "chunks": chunks})  # fmt: skip
        return listed

    def delete_collection(self, tenant: str, name: str) -> None:
        if not self.docstore.drop_collection(tenant, name):
            self._forget((tenant, name))
            raise CollectionNotFound(f"no collection {name}")
        self._forget((tenant, name))

    # documents
    async def upsert(self, tenant: str, name: str, documents: Sequence[Document]) -> list[str]:
        """Chunk, embed and store each document; its id is returned once it is durable."""
        await self.ready(tenant, name)
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
        await self.ready(tenant, name)
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
        info = await self.ready(tenant, name)
        vector = np.asarray((await self.embed([query]))[0], dtype=np.float32)
        fetch = top_k * 4 if where else top_k
        if self.router is not None and info is not None:
            min_seq = info.head if self.consistency == "strong" else 0
            scores, ids = await self.router.search(info, vector, fetch, min_seq)
        else:
            scores, ids = await self._batcher(tenant, name).search(vector, fetch)
        return await asyncio.to_thread(self._hits, scores, ids, top_k, min_score, where)

    async def ready(self, tenant: str, name: str) -> CollectionInfo | None:
        """Make the collection's local index fit to answer. ``strong``: caught up to the
        docstore's head as of now (every write acknowledged anywhere before this call is
        in it); ``eventual``: as the follower left it (loaded first if it never was).
        The collection as the docstore has it now (None: not looked up, eventual)."""
        key = (tenant, name)
        index = self._indexes.get(key)
        if self.consistency == "eventual" and index is not None:
            return None
        info = await asyncio.to_thread(self.docstore.info, tenant, name)
        if info is None:
            self._forget(key)
            raise CollectionNotFound(f"no collection {name}")
        if self.router is not None:
            return info  # the index workers catch up (to min_seq, when strong)
        if index is None or index.created != info.created or index.seq < info.head:
            await asyncio.to_thread(self._sync_one, info)
        return info

    def _batcher(self, tenant: str, name: str) -> SearchBatcher:
        """The collection's batcher: concurrent searches reach FAISS as one batch, on the
        collection's index as it is when the batch runs."""
        key = (tenant, name)
        batcher = self._batchers.get(key)
        if batcher is None:
            batcher = SearchBatcher(
                lambda vectors, k: self._index(tenant, name).search(vectors, k),
                window_s=self.batch_window_s, max_batch=self.max_batch,
            )  # fmt: skip
            self._batchers[key] = batcher
        return batcher

    def _hits(
        self,
        scores: np.ndarray,
        ids: np.ndarray,
        top_k: int,
        min_score: float | None,
        where: dict[str, Any] | None,
    ) -> list[Hit]:
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

    def _forget(self, key: tuple[str, str]) -> None:
        with self._catching_up.setdefault(key, threading.Lock()):
            self._batchers.pop(key, None)
            if self._indexes.pop(key, None) is not None:
                shutil.rmtree(self._dir(*key), ignore_errors=True)

    async def _follow(self, tenant: str, name: str, change: Change) -> None:
        if self.router is not None:
            return  # the index workers follow the log
        if self.consistency == "strong":
            await asyncio.to_thread(self._catch_up, tenant, name)
        else:
            task = asyncio.get_running_loop().create_task(
                asyncio.to_thread(self._catch_up, tenant, name)
            )
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    def _sync_one(self, info: CollectionInfo) -> None:
        """The collection's index as of the docstore: loaded (snapshot + the ops after it)
        when this process has none or has one of an earlier incarnation, else caught up."""
        key = (info.tenant, info.name)
        with self._catching_up.setdefault(key, threading.Lock()):
            index = self._indexes.get(key)
            if index is None or index.created != info.created:
                directory = self._dir(info.tenant, info.name)
                index = VectorIndex.load(directory, self.params, info.created)
                if index is None:
                    index = VectorIndex(info.dim, self.params, created=info.created)
                self._indexes[key] = index
        if index.seq < info.head:
            self._catch_up(info.tenant, info.name)

    def _catch_up(self, tenant: str, name: str) -> None:
        """Apply the docstore's new ops to the collection's index; one at a time, so an op
        is never applied twice and a rebuild never races an update."""
        key = (tenant, name)
        with self._catching_up.setdefault(key, threading.Lock()):
            index = self._indexes.get(key)
            if index is None:
                return  # the collection was deleted meanwhile
            before = index.seq
            _apply(index, self.docstore.changes_since(tenant, name, index.seq))
            if index.seq == before:
                return
            if len(index.tombstones) > max(64, index.size // 4):
                index = self._rebuild(tenant, name, index)  # HNSW: drop the tombstones
            self._since_snapshot[key] = self._since_snapshot.get(key, 0) + 1
            if self._since_snapshot[key] >= self.snapshot_every:
                index.save(self._dir(tenant, name))
                self._since_snapshot[key] = 0

    def _rebuild(self, tenant: str, name: str, old: VectorIndex) -> VectorIndex:
        """A new index from the docstore alone (removed chunks simply are not there)."""
        fresh = VectorIndex(old.dim, self.params, created=old.created)
        _apply(fresh, self.docstore.changes_since(tenant, name, 0))
        self._indexes[(tenant, name)] = fresh
        fresh.save(self._dir(tenant, name))
        return fresh


class Follower:
    """A thread that runs ``sync`` whenever the docstore says the log moved on (NOTIFY on
    PostgreSQL) and every ``interval_s`` in any case; a failed round is logged and the
    next one tries again."""

    def __init__(self, sync: Callable[[], None], db: Database, interval_s: float) -> None:
        self.sync = sync
        self.db = db
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"Follower(interval_s={self.interval_s})"

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="retrieval-follower",
                                            daemon=True)  # fmt: skip
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.db.wait_change(self._stop, self.interval_s)
            if self._stop.is_set():
                return
            try:
                self.sync()
            except Exception as exc:  # the database went away, for instance
                log.warning("retrieval follower: %s: %s", type(exc).__name__, exc)
        self.db.wait_change(self._stop, 0)  # lets the database close its listener


def _apply(index: VectorIndex, change: Change) -> None:
    if change.seq <= index.seq:
        return
    index.remove(change.removed)
    if change.added:
        ids = [i for i, _ in change.added]
        index.add(ids, np.stack([v for _, v in change.added]))
    index.seq = change.seq
