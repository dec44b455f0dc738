"""The docstore: SQLite in WAL mode, the source of truth every index is rebuilt from.

A write is acknowledged only after its transaction commits (``synchronous=FULL``), so it
survives a crash. Every change to a collection's chunks is also an entry in ``ops``
(add or remove, by chunk id, in commit order); an index snapshot records the last op it
contains, and on start the ops after it are replayed, so the index and the docstore
never disagree. Vectors are stored with their chunks (float32 bytes): rebuilding never
needs the embedding engine.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS collections (
    tenant TEXT NOT NULL, name TEXT NOT NULL, dim INTEGER NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (tenant, name));
CREATE TABLE IF NOT EXISTS documents (
    tenant TEXT NOT NULL, collection TEXT NOT NULL, doc_id TEXT NOT NULL, text TEXT NOT NULL,
    metadata TEXT NOT NULL, updated REAL NOT NULL, PRIMARY KEY (tenant, collection, doc_id));
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT, tenant TEXT NOT NULL, collection TEXT NOT NULL,
    doc_id TEXT NOT NULL, ord INTEGER NOT NULL, text TEXT NOT NULL, vector BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_by_doc ON chunks (tenant, collection, doc_id);
CREATE TABLE IF NOT EXISTS ops (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, tenant TEXT NOT NULL, collection TEXT NOT NULL,
    op TEXT NOT NULL, chunk_id INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS ops_by_collection ON ops (tenant, collection, seq);
"""


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
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"DocStore(path={str(self.path)!r})"

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # collections
    def create_collection(self, tenant: str, name: str, dim: int) -> bool:
        with self._tx() as db:
            found = db.execute(
                "SELECT 1 FROM collections WHERE tenant=? AND name=?", (tenant, name)
            ).fetchone()
            if found:
                return False
            db.execute(
                "INSERT INTO collections VALUES (?, ?, ?, ?)", (tenant, name, dim, time.time())
            )
            return True

    def collections(self, tenant: str | None = None) -> list[tuple[str, str, int]]:
        with self._lock:
            if tenant is None:
                rows = self._db.execute("SELECT tenant, name, dim FROM collections").fetchall()
            else:
                rows = self._db.execute(
                    "SELECT tenant, name, dim FROM collections WHERE tenant=?", (tenant,)
                ).fetchall()
        return [(str(t), str(n), int(d)) for t, n, d in rows]

    def collection_dim(self, tenant: str, name: str) -> int | None:
        with self._lock:
            row = self._db.execute(
                "SELECT dim FROM collections WHERE tenant=? AND name=?", (tenant, name)
            ).fetchone()
        return None if row is None else int(row[0])

    def drop_collection(self, tenant: str, name: str) -> bool:
        with self._tx() as db:
            gone = db.execute(
                "DELETE FROM collections WHERE tenant=? AND name=?", (tenant, name)
            ).rowcount
            for table in ("documents", "chunks", "ops"):
                db.execute(f"DELETE FROM {table} WHERE tenant=? AND collection=?", (tenant, name))
            return bool(gone)

    def document_count(self, tenant: str, name: str) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT count(*) FROM documents WHERE tenant=? AND collection=?", (tenant, name)
            ).fetchone()
        return int(row[0])

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
        with self._tx() as db:
            removed = self._remove_chunks(db, tenant, collection, doc_id)
            db.execute(
                "INSERT OR REPLACE INTO documents VALUES (?, ?, ?, ?, ?, ?)",
                (tenant, collection, doc_id, text, json.dumps(metadata), time.time()),
            )
            added = []
            for ord_, (chunk_text, vector) in enumerate(chunks):
                vec = np.asarray(vector, dtype=np.float32)
                cursor = db.execute(
                    "INSERT INTO chunks (tenant, collection, doc_id, ord, text, vector)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (tenant, collection, doc_id, ord_, chunk_text, vec.tobytes()),
                )
                chunk_id = int(cursor.lastrowid or 0)
                db.execute(
                    "INSERT INTO ops (tenant, collection, op, chunk_id) VALUES (?, ?, 'add', ?)",
                    (tenant, collection, chunk_id),
                )
                added.append((chunk_id, vec))
            return Change(self._last_seq(db), added, removed)

    def delete_document(self, tenant: str, collection: str, doc_id: str) -> Change | None:
        with self._tx() as db:
            gone = db.execute(
                "DELETE FROM documents WHERE tenant=? AND collection=? AND doc_id=?",
                (tenant, collection, doc_id),
            ).rowcount
            if not gone:
                return None
            removed = self._remove_chunks(db, tenant, collection, doc_id)
            return Change(self._last_seq(db), [], removed)

    def _remove_chunks(
        self, db: sqlite3.Connection, tenant: str, collection: str, doc_id: str
    ) -> list[int]:
        ids = [
            int(r[0])
            for r in db.execute(
                "SELECT id FROM chunks WHERE tenant=? AND collection=? AND doc_id=?",
                (tenant, collection, doc_id),
            )
        ]
        for chunk_id in ids:
            db.execute(
                "INSERT INTO ops (tenant, collection, op, chunk_id) VALUES (?, ?, 'remove', ?)",
                (tenant, collection, chunk_id),
            )
        db.execute(
            "DELETE FROM chunks WHERE tenant=? AND collection=? AND doc_id=?",
            (tenant, collection, doc_id),
        )
        return ids

    @staticmethod
    def _last_seq(db: sqlite3.Connection) -> int:
        row = db.execute("SELECT seq FROM sqlite_sequence WHERE name='ops'").fetchone()
        return int(row[0]) if row else 0

    # what indexes need
    def changes_since(self, tenant: str, collection: str, seq: int) -> Change:
        """Every op after ``seq``, as one change: a chunk added and removed within it is
        neither (so a rebuild from 0 holds exactly the live chunks)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT o.seq, o.op, o.chunk_id, c.vector FROM ops o LEFT JOIN chunks c"
                " ON c.id = o.chunk_id WHERE o.tenant=? AND o.collection=? AND o.seq>?"
                " ORDER BY o.seq",
                (tenant, collection, seq),
            ).fetchall()
        added: dict[int, np.ndarray] = {}
        born: set[int] = set()  # chunks added within this change (alive or not)
        removed: list[int] = []
        last = seq
        for op_seq, op, chunk_id, vector in rows:
            last = int(op_seq)
            chunk = int(chunk_id)
            if op == "add":
                born.add(chunk)
                if vector is not None:
                    added[chunk] = np.frombuffer(vector, dtype=np.float32)
            elif chunk in born:
                added.pop(chunk, None)  # came and went within the change: nothing to do
            else:
                removed.append(chunk)
        return Change(last, list(added.items()), removed)

    def chunks(self, ids: Sequence[int]) -> dict[int, Chunk]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        with self._lock:
            rows = self._db.execute(
                "SELECT c.id, c.doc_id, c.text, d.metadata FROM chunks c JOIN documents d"
                " ON d.tenant=c.tenant AND d.collection=c.collection AND d.doc_id=c.doc_id"
                f" WHERE c.id IN ({marks})",
                list(ids),
            ).fetchall()
        return {int(i): Chunk(int(i), str(d), str(t), json.loads(m)) for i, d, t, m in rows}
