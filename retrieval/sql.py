"""One SQL layer for the docstore: SQLite (one process) or PostgreSQL (shared by many).

The docstore writes its SQL once, with ``?`` placeholders and what both databases accept
(``ON CONFLICT ... DO UPDATE``, ``RETURNING``); a dialect adapter supplies what differs:
the schema's types, the placeholder style, the connection(s), and how a transaction
starts and what a dead connection raises.

``Database.tx()`` yields a ``Cursor`` inside one transaction, committed when the block
ends (a write is acknowledged only after that); ``Database.read()`` one for a read. A
database that cannot be reached raises ``StoreUnavailable`` (a ``RetrievalError``), so
callers never see a driver's own errors.
"""

from __future__ import annotations

import importlib
import queue
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from retrieval.errors import StoreUnavailable

Row = tuple[Any, ...]
Params = Sequence[Any]

# The schema, with {id}, {blob}, {real}, {big} filled in by the dialect.
SCHEMA = """
CREATE TABLE IF NOT EXISTS collections (
    tenant TEXT NOT NULL, name TEXT NOT NULL, dim INTEGER NOT NULL, created {real} NOT NULL,
    PRIMARY KEY (tenant, name));
CREATE TABLE IF NOT EXISTS documents (
    tenant TEXT NOT NULL, collection TEXT NOT NULL, doc_id TEXT NOT NULL, text TEXT NOT NULL,
    metadata TEXT NOT NULL, updated {real} NOT NULL, PRIMARY KEY (tenant, collection, doc_id));
CREATE TABLE IF NOT EXISTS chunks (
    id {id}, tenant TEXT NOT NULL, collection TEXT NOT NULL,
    doc_id TEXT NOT NULL, ord INTEGER NOT NULL, text TEXT NOT NULL, vector {blob} NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_by_doc ON chunks (tenant, collection, doc_id);
CREATE TABLE IF NOT EXISTS ops (
    seq {id}, tenant TEXT NOT NULL, collection TEXT NOT NULL,
    op TEXT NOT NULL, chunk_id {big} NOT NULL);
CREATE INDEX IF NOT EXISTS ops_by_collection ON ops (tenant, collection, seq);
CREATE TABLE IF NOT EXISTS index_workers (
    worker TEXT PRIMARY KEY, url TEXT NOT NULL, lease_until {real} NOT NULL);
CREATE TABLE IF NOT EXISTS shard_owners (
    tenant TEXT NOT NULL, collection TEXT NOT NULL, shard INTEGER NOT NULL,
    owner TEXT NOT NULL, url TEXT NOT NULL, lease_until {real} NOT NULL,
    PRIMARY KEY (tenant, collection, shard));
"""
# Columns added after the first release: (table, column, declaration). A docstore made
# before them gains them on open; ``head`` is then set from the ops already there.
MIGRATIONS = (
    ("collections", "head", "{big} NOT NULL DEFAULT 0"),  # the last op's seq
    ("collections", "shards", "INTEGER NOT NULL DEFAULT 1"),
    ("ops", "shard", "INTEGER NOT NULL DEFAULT 0"),
)


class Cursor(Protocol):
    def execute(self, sql: str, params: Params = ()) -> Cursor: ...
    def fetchone(self) -> Row | None: ...
    def fetchall(self) -> list[Row]: ...
    @property
    def rowcount(self) -> int: ...


class Database(Protocol):
    dialect: str

    def tx(self) -> Any: ...  # a context manager yielding a Cursor, in one transaction
    def read(self) -> Any: ...  # a context manager yielding a Cursor
    def notify(self, cursor: Cursor) -> None: ...  # tell followers the log moved on
    def wait_change(self, stop: threading.Event, timeout_s: float) -> None: ...
    def close(self) -> None: ...


def open_database(target: Path | str) -> Database:
    """A ``postgresql://`` URL opens PostgreSQL; anything else is a SQLite file."""
    text = str(target)
    if text.startswith(("postgresql://", "postgres://")):
        return Postgres(text)
    return SQLite(Path(target))


def _schema(dialect: dict[str, str]) -> list[str]:
    return [s.strip() for s in SCHEMA.format(**dialect).split(";") if s.strip()]


class SQLite:
    """One connection in WAL mode, ``synchronous=FULL``; transactions take the write lock
    at once (``BEGIN IMMEDIATE``), so writers are serialised in commit order."""

    dialect = "sqlite"
    TYPES = {"id": "INTEGER PRIMARY KEY AUTOINCREMENT", "blob": "BLOB", "real": "REAL",
             "big": "INTEGER"}  # fmt: skip

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        for statement in _schema(self.TYPES):
            self._db.execute(statement)
        with self.tx() as cur:
            for table, column, declaration in MIGRATIONS:
                names = {r[1] for r in cur.execute(f"PRAGMA table_info({table})").fetchall()}
                if column not in names:
                    decl = declaration.format(**self.TYPES)
                    cur.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
                    if column == "head":
                        _set_heads(cur)

    def __repr__(self) -> str:
        return f"SQLite(path={str(self.path)!r})"

    @contextmanager
    def tx(self) -> Iterator[Cursor]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise StoreUnavailable(f"docstore: {exc}") from exc
            try:
                yield self._db.cursor()
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def read(self) -> Iterator[Cursor]:
        with self._lock:
            yield self._db.cursor()

    def notify(self, cursor: Cursor) -> None:
        return None  # other processes on the same file find out by polling

    def wait_change(self, stop: threading.Event, timeout_s: float) -> None:
        """Until ``timeout_s`` passed or ``stop`` is set (SQLite cannot say more)."""
        stop.wait(timeout_s)

    def close(self) -> None:
        self._db.close()


class Postgres:
    """A small pool of autocommit connections (``pool_size``, made as needed); a write
    runs in one transaction on one of them. Followers are woken by ``NOTIFY``."""

    dialect = "postgresql"
    CHANNEL = "weir_retrieval"
    SLICE_S = 0.5  # the longest a follower's wait goes without looking at its stop flag
    TYPES = {"id": "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", "blob": "BYTEA",
             "real": "DOUBLE PRECISION", "big": "BIGINT"}  # fmt: skip

    def __init__(
        self,
        url: str,
        pool_size: int = 8,
        connect_timeout_s: float = 5.0,
        statement_timeout_s: float = 30.0,
    ) -> None:
        self.psycopg: Any = importlib.import_module("psycopg")
        self.url = url
        self.connect_timeout_s = connect_timeout_s
        self.statement_timeout_ms = int(statement_timeout_s * 1000)
        self._idle: queue.LifoQueue[Any] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(pool_size)
        self._listener: Any = None
        with self.tx() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(7243001)")  # one schema maker at a time
            for statement in _schema(self.TYPES):
                cur.execute(statement)
            for table, column, declaration in MIGRATIONS:
                found = cur.execute(
                    "SELECT 1 FROM information_schema.columns WHERE table_name=? AND"
                    " column_name=? AND table_schema=current_schema()",
                    (table, column),
                ).fetchone()
                if found is None:
                    decl = declaration.format(**self.TYPES)
                    cur.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
                    if column == "head":
                        _set_heads(cur)

    def __repr__(self) -> str:
        return "Postgres(url=<hidden>)"

    def connect(self) -> Any:
        """A new autocommit connection (also the follower's, for LISTEN)."""
        try:
            conn = self.psycopg.connect(
                self.url, autocommit=True, connect_timeout=max(1, int(self.connect_timeout_s))
            )
            conn.execute(
                "SELECT set_config('statement_timeout', %s, false)",
                (str(self.statement_timeout_ms),),
            )
        except self.psycopg.OperationalError as exc:
            raise StoreUnavailable(f"docstore: {exc}") from exc
        return conn

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        self._slots.acquire()
        try:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                conn = self.connect()
            try:
                yield conn
            except self.psycopg.OperationalError as exc:
                conn.close()  # broken: never back into the pool
                raise StoreUnavailable(f"docstore: {exc}") from exc
            except BaseException:
                if conn.closed or conn.info.transaction_status != 0:  # not idle: drop it
                    conn.close()
                else:
                    self._idle.put(conn)
                raise
            self._idle.put(conn)
        finally:
            self._slots.release()

    @contextmanager
    def tx(self) -> Iterator[Cursor]:
        with self._connection() as conn, conn.transaction():
            yield _PgCursor(conn.cursor())

    @contextmanager
    def read(self) -> Iterator[Cursor]:
        with self._connection() as conn:
            yield _PgCursor(conn.cursor())

    def notify(self, cursor: Cursor) -> None:
        cursor.execute(f"NOTIFY {self.CHANNEL}")  # delivered at commit, never before

    def wait_change(self, stop: threading.Event, timeout_s: float) -> None:
        """Until a write anywhere notifies, ``timeout_s`` passed or ``stop`` is set (one
        thread's: the follower's). The listening connection is made on first use, and
        again after it failed; a timeout of 0 after ``stop`` closes it."""
        if stop.is_set():
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            return
        try:
            if self._listener is None:
                self._listener = self.connect()
                self._listener.execute(f"LISTEN {self.CHANNEL}")
            deadline = time.monotonic() + timeout_s
            while not stop.is_set():  # in slices, so that a stop is seen within one
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                gen = self._listener.notifies(timeout=min(left, self.SLICE_S), stop_after=1)
                if list(gen):
                    return
        except (self.psycopg.Error, StoreUnavailable):
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            stop.wait(timeout_s)  # unreachable: poll at the interval until it is back

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return


class _PgCursor:
    """psycopg's cursor with ``?`` placeholders (our SQL has no other question marks)."""

    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor

    def execute(self, sql: str, params: Params = ()) -> _PgCursor:
        self._cursor.execute(sql.replace("?", "%s"), params)
        return self

    def fetchone(self) -> Row | None:
        row = self._cursor.fetchone()
        return None if row is None else tuple(row)

    def fetchall(self) -> list[Row]:
        return [tuple(r) for r in self._cursor.fetchall()]

    @property
    def rowcount(self) -> int:
        return int(self._cursor.rowcount)


def _set_heads(cur: Cursor) -> None:
    cur.execute(
        "UPDATE collections SET head = COALESCE((SELECT MAX(o.seq) FROM ops o WHERE"
        " o.tenant = collections.tenant AND o.collection = collections.name), 0)"
    )
