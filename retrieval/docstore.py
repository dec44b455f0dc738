"""The docstore: the source of truth every index is rebuilt from, in SQLite (one process,
WAL mode, ``synchronous=FULL``) or PostgreSQL (shared by every gateway and index worker),
through one SQL layer (``retrieval.sql``).

A write is acknowledged only after its transaction commits, so it survives a crash.
Every change to a collection's chunks is also an entry in ``ops`` (add or remove, by
chunk id, with its shard); a write first locks its collection's row, so within a
collection ops commit in ``seq`` order and ``collections.head`` (the last op's seq,
set in the same transaction) never names an op that is not visible. An index (a whole
collection, or one shard of it) records the last op it contains; it catches up by
reading the head, then the ops up to it. Vectors are stored with their chunks (float32
bytes): rebuilding never needs the embedding engine.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import CollectionNotFound
from retrieval.sql import Cursor, Database, open_database


def shard_of(doc_id: str, shards: int) -> int:
    """The shard a document's chunks live in: a stable hash of its id."""
    if shards <= 1:
        return 0
    return int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "little") % shards


@dataclass(frozen=True)
class CollectionInfo:
    tenant: str
    name: str
    dim: int
    created: float  # with the name, which incarnation of the collection this is
    head: int  # the seq of its last op
    shards: int


@dataclass(frozen=True)
class Chunk:
    id: int
    doc_id: str
    text: str
    metadata: dict[str, Any]


@dataclass(frozen=True)
class Change:
    """What one write did to a collection's index: ops up to ``seq``."""

    seq: int
    added: list[tuple[int, np.ndarray]]  # chunk id, vector
    removed: list[int]


class DocStore:
    def __init__(self, target: Path | str) -> None:
        """``target``: a SQLite file, or a ``postgresql://`` URL."""
        self.db: Database = open_database(target)

    def __repr__(self) -> str:
        return f"DocStore({self.db!r})"

    def close(self) -> None:
        self.db.close()

    # collections
    def create_collection(self, tenant: str, name: str, dim: int, shards: int = 1) -> bool:
        with self.db.tx() as cur:
            made = cur.execute(
                "INSERT INTO collections (tenant, name, dim, created, head, shards)"
                " VALUES (?, ?, ?, ?, 0, ?) ON CONFLICT (tenant, name) DO NOTHING",
                (tenant, name, dim, time.time(), shards),
            ).rowcount
            if made:
                self.db.notify(cur)
            return bool(made)

    def collections(self, tenant: str | None = None) -> list[tuple[str, str, int]]:
        return [(c.tenant, c.name, c.dim) for c in self.infos(tenant)]

    def infos(self, tenant: str | None = None) -> list[CollectionInfo]:
        sql = "SELECT tenant, name, dim, created, head, shards FROM collections"
        with self.db.read() as cur:
            if tenant is None:
                rows = cur.execute(sql).fetchall()
            else:
                rows = cur.execute(sql + " WHERE tenant=?", (tenant,)).fetchall()
        return [_info(r) for r in rows]

    def info(self, tenant: str, name: str) -> CollectionInfo | None:
        if not _keyable(name):
            return None
        with self.db.read() as cur:
            row = cur.execute(
                "SELECT tenant, name, dim, created, head, shards FROM collections"
                " WHERE tenant=? AND name=?",
                (tenant, name),
            ).fetchone()
        return None if row is None else _info(row)

    def collection_dim(self, tenant: str, name: str) -> int | None:
        info = self.info(tenant, name)
        return None if info is None else info.dim

    def drop_collection(self, tenant: str, name: str) -> bool:
        if not _keyable(name):
            return False
        with self.db.tx() as cur:
            gone = cur.execute(
                "DELETE FROM collections WHERE tenant=? AND name=?", (tenant, name)
            ).rowcount
            for table in ("documents", "chunks", "ops", "shard_owners"):
                cur.execute(f"DELETE FROM {table} WHERE tenant=? AND collection=?", (tenant, name))
            self.db.notify(cur)
            return bool(gone)

    def document_count(self, tenant: str, name: str) -> int:
        with self.db.read() as cur:
            row = cur.execute(
                "SELECT count(*) FROM documents WHERE tenant=? AND collection=?", (tenant, name)
            ).fetchone()
        return int(row[0]) if row else 0

    def chunk_count(self, tenant: str, name: str) -> int:
        with self.db.read() as cur:
            row = cur.execute(
                "SELECT count(*) FROM chunks WHERE tenant=? AND collection=?", (tenant, name)
            ).fetchone()
        return int(row[0]) if row else 0

    # documents
    def put_document(
        self,
        tenant: str,
        collection: str,
        doc_id: str,
        text: str,
        metadata: dict[str, Any],
        chunks: Sequence[tuple[str, np.ndarray]],
    ) -> Change:
        """Insert or replace a document and its chunks, atomically."""
        with self.db.tx() as cur:
            shards = _lock(cur, tenant, collection)
            shard = shard_of(doc_id, shards)
            last, removed = self._remove_chunks(cur, tenant, collection, doc_id, shard)
            cur.execute(
                "INSERT INTO documents (tenant, collection, doc_id, text, metadata, updated)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (tenant, collection, doc_id) DO UPDATE"
                " SET text=excluded.text, metadata=excluded.metadata, updated=excluded.updated",
                (tenant, collection, doc_id, text, json.dumps(metadata), time.time()),
            )
            added = []
            for ord_, (chunk_text, vector) in enumerate(chunks):
                vec = np.asarray(vector, dtype=np.float32)
                row = cur.execute(
                    "INSERT INTO chunks (tenant, collection, doc_id, ord, text, vector)"
                    " VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
                    (tenant, collection, doc_id, ord_, chunk_text, vec.tobytes()),
                ).fetchone()
                chunk_id = int(row[0]) if row else 0
                last = _op(cur, tenant, collection, "add", chunk_id, shard)
                added.append((chunk_id, vec))
            return Change(self._advance(cur, tenant, collection, last), added, removed)

    def delete_document(self, tenant: str, collection: str, doc_id: str) -> Change | None:
        if not _keyable(doc_id):
            return None
        with self.db.tx() as cur:
            shards = _lock(cur, tenant, collection)
            gone = cur.execute(
                "DELETE FROM documents WHERE tenant=? AND collection=? AND doc_id=?",
                (tenant, collection, doc_id),
            ).rowcount
            if not gone:
                return None
            shard = shard_of(doc_id, shards)
            last, removed = self._remove_chunks(cur, tenant, collection, doc_id, shard)
            return Change(self._advance(cur, tenant, collection, last), [], removed)

    def _advance(self, cur: Cursor, tenant: str, collection: str, last: int | None) -> int:
        """The collection's head moves to ``last`` (in the write's transaction); its seq."""
        if last is None:
            row = cur.execute(
                "SELECT head FROM collections WHERE tenant=? AND name=?", (tenant, collection)
            ).fetchone()
            return int(row[0]) if row else 0
        cur.execute(
            "UPDATE collections SET head=? WHERE tenant=? AND name=?", (last, tenant, collection)
        )
        self.db.notify(cur)
        return last

    @staticmethod
    def _remove_chunks(
        cur: Cursor, tenant: str, collection: str, doc_id: str, shard: int
    ) -> tuple[int | None, list[int]]:
        ids = [
            int(r[0])
            for r in cur.execute(
                "SELECT id FROM chunks WHERE tenant=? AND collection=? AND doc_id=?",
                (tenant, collection, doc_id),
            ).fetchall()
        ]
        last = None
        for chunk_id in ids:
            last = _op(cur, tenant, collection, "remove", chunk_id, shard)
        cur.execute(
            "DELETE FROM chunks WHERE tenant=? AND collection=? AND doc_id=?",
            (tenant, collection, doc_id),
        )
        return last, ids

    # what indexes need
    def head(self, tenant: str, collection: str) -> int | None:
        """The seq of the collection's last op (None: no such collection)."""
        with self.db.read() as cur:
            row = cur.execute(
                "SELECT head FROM collections WHERE tenant=? AND name=?", (tenant, collection)
            ).fetchone()
        return None if row is None else int(row[0])

    def changes_since(
        self, tenant: str, collection: str, seq: int, shard: int | None = None
    ) -> Change:
        """Every op after ``seq`` (of one ``shard``, or all), as one change up to the
        collection's head: a chunk added and removed within it is neither (so a rebuild
        from 0 holds exactly the live chunks)."""
        head = self.head(tenant, collection)
        if head is None or head <= seq:
            return Change(max(seq, head or 0), [], [])
        where = "o.tenant=? AND o.collection=? AND o.seq>? AND o.seq<=?"
        params: list[Any] = [tenant, collection, seq, head]
        if shard is not None:
            where += " AND o.shard=?"
            params.append(shard)
        with self.db.read() as cur:
            rows = cur.execute(
                "SELECT o.op, o.chunk_id, c.vector FROM ops o LEFT JOIN chunks c"
                f" ON c.id = o.chunk_id WHERE {where} ORDER BY o.seq",
                params,
            ).fetchall()
        added: dict[int, np.ndarray] = {}
        born: set[int] = set()  # chunks added within this change (alive or not)
        removed: list[int] = []
        for op, chunk_id, vector in rows:
            chunk = int(chunk_id)
            if op == "add":
                born.add(chunk)
                if vector is not None:
                    added[chunk] = np.frombuffer(bytes(vector), dtype=np.float32)
            elif chunk in born:
                added.pop(chunk, None)  # came and went within the change: nothing to do
            else:
                removed.append(chunk)
        return Change(head, list(added.items()), removed)

    def chunks(self, ids: Sequence[int]) -> dict[int, Chunk]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        with self.db.read() as cur:
            rows = cur.execute(
                "SELECT c.id, c.doc_id, c.text, d.metadata FROM chunks c JOIN documents d"
                " ON d.tenant=c.tenant AND d.collection=c.collection AND d.doc_id=c.doc_id"
                f" WHERE c.id IN ({marks})",
                list(ids),
            ).fetchall()
        return {int(i): Chunk(int(i), str(d), str(t), json.loads(m)) for i, d, t, m in rows}


def _keyable(text: str) -> bool:
    """Whether ``text`` can be a name or id here: PostgreSQL's text holds no NUL and a lone
    surrogate is no UTF-8, so asking for one would fail the query, where a name or id that
    cannot exist is simply not found."""
    return "\x00" not in text and not any("\ud800" <= c <= "\udfff" for c in text)


def _info(row: tuple[Any, ...]) -> CollectionInfo:
    tenant, name, dim, created, head, shards = row
    return CollectionInfo(str(tenant), str(name), int(dim), float(created), int(head), int(shards))


def _lock(cur: Cursor, tenant: str, collection: str) -> int:
    """Lock the collection's row for this transaction (writers to one collection commit
    one after another, so its ops' seqs rise in commit order); its shard count."""
    row = cur.execute(
        "UPDATE collections SET head=head WHERE tenant=? AND name=? RETURNING shards",
        (tenant, collection),
    ).fetchone()
    if row is None:
        raise CollectionNotFound(f"no collection {collection}")
    return int(row[0])


def _op(cur: Cursor, tenant: str, collection: str, op: str, chunk_id: int, shard: int) -> int:
    row = cur.execute(
        "INSERT INTO ops (tenant, collection, op, chunk_id, shard) VALUES (?, ?, ?, ?, ?)"
        " RETURNING seq",
        (tenant, collection, op, chunk_id, shard),
    ).fetchone()
    return int(row[0]) if row else 0
