"""The batch store's database: a SQLite file (the gateway processes of one host) or
PostgreSQL (every gateway of a deployment), through SQLAlchemy Core.

The store writes its SQL once, with ``:name`` parameters (SQLAlchemy gives each driver its
own placeholders) and what both databases accept (``RETURNING``, ``ON CONFLICT``, partial
indexes); a ``Dialect`` supplies what differs: the column types of the schema and how a
field of a JSON column is read. The schema is made on first use (PostgreSQL: under an
advisory lock, one gateway at a time).

``run`` calls the work in a worker thread, off the event loop, inside one transaction
committed when it returns. SQLite: one connection per process (calls wait for it, as
they waited for the old lock), WAL, ``synchronous=NORMAL`` (a killed process loses no
commit); a write takes the file's write lock at once (``BEGIN IMMEDIATE``: no deadlock
between two processes upgrading reads), a read does not. PostgreSQL: a small pool of
psycopg 3 connections (checked before use), ``READ COMMITTED``; a statement waits at
most ``STATEMENT_TIMEOUT_S``. Driver and OS errors become the caller's own error (a 503).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

T = TypeVar("T")
POOL_WAIT_S = 30.0  # a call waits this long for a free connection
PG_POOL = 4  # PostgreSQL connections per process (and as many more under load)
STATEMENT_TIMEOUT_S = 60.0  # PostgreSQL: one statement (a 50 MiB file's bytes, a batch's lines)
SCHEMA_LOCK = 7243023  # pg_advisory_xact_lock key: one schema maker at a time


@dataclass(frozen=True, slots=True)
class Dialect:
    name: str  # "sqlite" or "postgresql"
    blob: str
    real: str
    big: str

    def number(self, column: str, field: str) -> str:
        """A numeric top-level field of a JSON text column (NULL when absent)."""
        if self.name == "sqlite":
            return f"json_extract({column}, '$.{field}')"
        return f"(CAST(CAST({column} AS jsonb) ->> '{field}' AS double precision))"

    def string(self, column: str, field: str) -> str:
        """A text top-level field of a JSON text column (NULL when absent)."""
        if self.name == "sqlite":
            return f"json_extract({column}, '$.{field}')"
        return f"(CAST({column} AS jsonb) ->> '{field}')"


SQLITE = Dialect("sqlite", blob="BLOB", real="REAL", big="INTEGER")
POSTGRES = Dialect("postgresql", blob="BYTEA", real="DOUBLE PRECISION", big="BIGINT")


def is_postgres(target: Path | str) -> bool:
    return str(target).startswith(("postgresql://", "postgres://", "postgresql+psycopg://"))


class Database:
    """``target``: a SQLite file's path, or a ``postgresql://`` URL (the password from the
    URL or libpq's ``PGPASSWORD``). Nothing is opened before the first ``run``."""

    def __init__(
        self,
        target: Path | str,
        *,
        timeout_s: float,
        schema: Callable[[Dialect], Sequence[str]],
        unavailable: Callable[[str], Exception],
    ) -> None:
        self.target = target
        self.dialect = POSTGRES if is_postgres(target) else SQLITE
        self.timeout_s = timeout_s  # connecting; SQLite: waiting for another process's lock
        self.schema = schema  # the statements that make the tables, for a dialect
        self.unavailable = unavailable  # (the error's type name) -> the error to raise
        self._engine: Engine | None = None
        self._opening = threading.Lock()

    def __repr__(self) -> str:
        where = "<postgresql>" if self.dialect is POSTGRES else str(self.target)
        return f"Database({where})"

    async def run(self, work: Callable[[Connection], T], *, write: bool = True) -> T:
        """``work`` in one transaction, in a worker thread; ``write=False`` for a read."""

        def call() -> T:
            with self._open().connect() as conn:
                if not write:
                    conn.execution_options(weir_read=True)
                with conn.begin():
                    return work(conn)

        try:
            return await asyncio.to_thread(call)
        except (SQLAlchemyError, OSError) as exc:
            raise self.unavailable(type(getattr(exc, "orig", None) or exc).__name__) from exc

    async def aclose(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            await asyncio.to_thread(engine.dispose)

    def _open(self) -> Engine:
        with self._opening:
            if self._engine is None:
                engine = self._make_engine()
                try:
                    with engine.begin() as conn:
                        if self.dialect is POSTGRES:
                            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                                         {"key": SCHEMA_LOCK})  # fmt: skip
                        for statement in self.schema(self.dialect):
                            conn.exec_driver_sql(statement)
                except BaseException:
                    engine.dispose()
                    raise
                self._engine = engine
            return self._engine

    def _make_engine(self) -> Engine:
        if self.dialect is POSTGRES:
            url = str(self.target)
            for scheme in ("postgresql://", "postgres://"):
                if url.startswith(scheme):
                    url = "postgresql+psycopg://" + url[len(scheme) :]
            timeout_ms = int(STATEMENT_TIMEOUT_S * 1000)
            return create_engine(
                url,
                pool_pre_ping=True,
                pool_size=PG_POOL,
                max_overflow=PG_POOL,
                pool_timeout=POOL_WAIT_S,
                connect_args={
                    "connect_timeout": max(1, int(self.timeout_s)),
                    "options": f"-c statement_timeout={timeout_ms}",
                },
            )
        path = Path(self.target).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            f"sqlite:///{path}",
            pool_size=1,  # one connection per process: calls take turns
            max_overflow=0,
            pool_timeout=POOL_WAIT_S,
            connect_args={"timeout": self.timeout_s, "check_same_thread": False},
        )
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine


def _sqlite_connect(dbapi: Any, _: Any) -> None:
    dbapi.isolation_level = None  # transactions are begun by _sqlite_begin, not the driver
    dbapi.execute("PRAGMA journal_mode=WAL")
    dbapi.execute("PRAGMA synchronous=NORMAL")


def _sqlite_begin(conn: Connection) -> None:
    read = conn.get_execution_options().get("weir_read", False)
    conn.exec_driver_sql("BEGIN" if read else "BEGIN IMMEDIATE")
