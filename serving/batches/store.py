"""Files and batches in one SQLite file (WAL), opened on first use.

Three tables: ``files`` (uploads and the output/error files a batch writes, by tenant),
``batches`` (the Batch object as JSON, its caller, and which gateway process runs it:
``owner`` with a lease), and ``lines`` (a batch's input requests and, once done, each one's
output line). A line's result is written once (``WHERE result IS NULL``) and a running
batch only takes lines without one, so no request runs again after its result was
written, whatever crashes. Calls run in a worker thread, one at a time, off the event
loop; sqlite3's errors become ``BatchesUnavailable`` (503) here.

A file's expiry is its File object's ``expires_at`` (indexed as an expression, so a store
written before expiry needs no migration): from then on the tenant's reads do not find it
(every read is given ``now``), and ``sweep`` deletes its row and bytes, except while an
unfinished batch names it as its input file (then at the first sweep after that batch
ends). A batch's ``caller`` holds what its runner needs that the Batch object does not
show: who created it and ``output_expires_s`` (its output files' lifetime).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import orjson

from serving.errors import BatchesUnavailable
from serving.sqlite_file import SqliteFile

T = TypeVar("T")
JSON = dict[str, Any]
RUNNING = ("validating", "in_progress", "finalizing", "cancelling")
EXPIRES = "json_extract(record, '$.expires_at')"  # NULL: kept until deleted
LIVE = f"({EXPIRES} IS NULL OR {EXPIRES} > ?)"  # not expired at ``now``

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS files (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, "
    "record TEXT NOT NULL, content BLOB NOT NULL, created_at INTEGER NOT NULL)",
    "CREATE INDEX IF NOT EXISTS files_tenant ON files (tenant, created_at)",
    f"CREATE INDEX IF NOT EXISTS files_expiry ON files ({EXPIRES}) WHERE {EXPIRES} IS NOT NULL",
    "CREATE TABLE IF NOT EXISTS batches (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, "
    "record TEXT NOT NULL, caller TEXT NOT NULL, status TEXT NOT NULL, "
    "owner TEXT, lease_until REAL NOT NULL DEFAULT 0, created_at INTEGER NOT NULL)",
    "CREATE INDEX IF NOT EXISTS batches_tenant ON batches (tenant, created_at)",
    "CREATE INDEX IF NOT EXISTS batches_status ON batches (status)",
    "CREATE TABLE IF NOT EXISTS lines (batch_id TEXT NOT NULL, n INTEGER NOT NULL, "
    "custom_id TEXT NOT NULL, body BLOB NOT NULL, result BLOB, ok INTEGER, "
    "PRIMARY KEY (batch_id, n))",
    "CREATE INDEX IF NOT EXISTS lines_pending ON lines (batch_id, result) WHERE result IS NULL",
)


@dataclass(frozen=True, slots=True)
class Line:
    n: int  # its place in the input file, from 0
    custom_id: str
    body: bytes  # the request's body (JSON)


@dataclass(frozen=True, slots=True)
class Claimed:
    batch: JSON
    caller: JSON


class BatchStore:
    def __init__(self, path: Path, *, timeout_s: float = 5.0) -> None:
        self.path = path.expanduser()
        self._file = SqliteFile(
            self.path,
            timeout_s=timeout_s,
            # WAL with synchronous=NORMAL: a killed process loses no commit
            setup=("PRAGMA synchronous=NORMAL", *SCHEMA),
            unavailable=lambda why: BatchesUnavailable(f"The batch store is unavailable ({why})."),
        )

    def __repr__(self) -> str:
        return f"BatchStore(path={str(self.path)!r})"

    # -- files ----------------------------------------------------------------------

    async def put_file(self, tenant: str, record: JSON, content: bytes) -> None:
        def write(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO files (id, tenant, record, content, created_at) VALUES (?,?,?,?,?)",
                (record["id"], tenant, orjson.dumps(record), content, record["created_at"]),
            )

        await self._run(write)

    async def file(self, tenant: str, file_id: str, now: float) -> JSON | None:
        """The File object, unless it has expired at ``now``."""

        def read(db: sqlite3.Connection) -> JSON | None:
            row = db.execute(
                f"SELECT record FROM files WHERE id = ? AND tenant = ? AND {LIVE}",
                (file_id, tenant, now),
            ).fetchone()
            return _loads(row[0]) if row else None

        return await self._run(read)

    async def content(self, tenant: str, file_id: str, now: float) -> bytes | None:
        def read(db: sqlite3.Connection) -> bytes | None:
            row = db.execute(
                f"SELECT content FROM files WHERE id = ? AND tenant = ? AND {LIVE}",
                (file_id, tenant, now),
            ).fetchone()
            return bytes(row[0]) if row else None

        return await self._run(read)

    async def files(
        self, tenant: str, purpose: str | None, limit: int, desc: bool, now: float
    ) -> list[JSON]:
        def read(db: sqlite3.Connection) -> list[JSON]:
            order = "DESC" if desc else "ASC"
            rows = db.execute(
                f"SELECT record FROM files WHERE tenant = ? AND {LIVE} "
                f"ORDER BY created_at {order}, id {order}",
                (tenant, now),
            )
            found = []
            for (raw,) in rows:
                record = _loads(raw)
                if purpose is None or record.get("purpose") == purpose:
                    found.append(record)
                    if len(found) >= limit:
                        break
            return found

        return await self._run(read)

    async def delete_file(self, tenant: str, file_id: str, now: float) -> bool:
        def remove(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                f"DELETE FROM files WHERE id = ? AND tenant = ? AND {LIVE}", (file_id, tenant, now)
            )
            return cursor.rowcount > 0

        return await self._run(remove)

    async def sweep(self, now: float, limit: int) -> int:
        """Delete up to ``limit`` files expired at ``now`` (row and bytes), none that an
        unfinished batch reads; how many were deleted."""

        def remove(db: sqlite3.Connection) -> int:
            marks = ",".join("?" * len(RUNNING))
            source = "json_extract(record, '$.input_file_id')"
            cursor = db.execute(
                f"DELETE FROM files WHERE id IN (SELECT id FROM files WHERE {EXPIRES} <= ? "
                f"AND id NOT IN (SELECT {source} FROM batches WHERE status IN ({marks}) "
                f"AND {source} IS NOT NULL) LIMIT ?)",
                (now, *RUNNING, limit),
            )
            return cursor.rowcount

        return await self._run(remove)

    # -- batches --------------------------------------------------------------------

    async def create_batch(
        self, tenant: str, batch: JSON, caller: JSON, lines: Iterable[Line]
    ) -> None:
        """The batch and its input lines, in one transaction."""

        def write(db: sqlite3.Connection) -> None:
            with _transaction(db):
                db.execute(
                    "INSERT INTO batches (id, tenant, record, caller, status, created_at) "
                    "VALUES (?,?,?,?,?,?)",
                    (batch["id"], tenant, orjson.dumps(batch), orjson.dumps(caller),
                     batch["status"], batch["created_at"]),
                )  # fmt: skip
                db.executemany(
                    "INSERT INTO lines (batch_id, n, custom_id, body) VALUES (?,?,?,?)",
                    ((batch["id"], line.n, line.custom_id, line.body) for line in lines),
                )

        await self._run(write)

    async def batch(self, tenant: str | None, batch_id: str) -> JSON | None:
        """The Batch object (any tenant's when ``tenant`` is None: the runner)."""

        def read(db: sqlite3.Connection) -> JSON | None:
            if tenant is None:
                row = db.execute("SELECT record FROM batches WHERE id = ?", (batch_id,))
            else:
                row = db.execute(
                    "SELECT record FROM batches WHERE id = ? AND tenant = ?", (batch_id, tenant)
                )
            found = row.fetchone()
            return _loads(found[0]) if found else None

        return await self._run(read)

    async def batches(self, tenant: str, limit: int, after: str | None) -> list[JSON]:
        """Newest first, ``limit`` of them after the batch ``after``."""

        def read(db: sqlite3.Connection) -> list[JSON]:
            start = None
            if after is not None:
                start = db.execute(
                    "SELECT created_at, id FROM batches WHERE id = ? AND tenant = ?",
                    (after, tenant),
                ).fetchone()
            if start is None:
                rows = db.execute(
                    "SELECT record FROM batches WHERE tenant = ? "
                    "ORDER BY created_at DESC, id DESC LIMIT ?",
                    (tenant, limit),
                )
            else:
                rows = db.execute(
                    "SELECT record FROM batches WHERE tenant = ? AND (created_at < ? OR "
                    "(created_at = ? AND id < ?)) ORDER BY created_at DESC, id DESC LIMIT ?",
                    (tenant, start[0], start[0], start[1], limit),
                )
            return [_loads(raw) for (raw,) in rows]

        return await self._run(read)

    async def save(self, batch: JSON, *, unless: tuple[str, ...] = ()) -> bool:
        """Write the Batch object (and its status), unless its stored status is in
        ``unless`` (a cancel another process saw first); True when written."""

        def write(db: sqlite3.Connection) -> bool:
            marks = ",".join("?" * len(unless)) or "''"
            cursor = db.execute(
                "UPDATE batches SET record = ?, status = ? "
                f"WHERE id = ? AND status NOT IN ({marks})",
                (orjson.dumps(batch), batch["status"], batch["id"], *unless),
            )
            return cursor.rowcount > 0

        return await self._run(write)

    async def claim(self, owner: str, now: float, lease_s: float) -> list[Claimed]:
        """Running batches this process now holds: its own, and those whose holder's
        lease ran out (a gateway that died or stopped)."""

        def take(db: sqlite3.Connection) -> list[Claimed]:
            marks = ",".join("?" * len(RUNNING))
            with _transaction(db):
                db.execute(
                    f"UPDATE batches SET owner = ?, lease_until = ? WHERE status IN ({marks}) "
                    "AND (owner = ? OR owner IS NULL OR lease_until < ?)",
                    (owner, now + lease_s, *RUNNING, owner, now),
                )
                rows = db.execute(
                    f"SELECT record, caller FROM batches WHERE owner = ? AND status IN ({marks})",
                    (owner, *RUNNING),
                ).fetchall()
            return [Claimed(_loads(r), _loads(c)) for r, c in rows]

        return await self._run(take)

    async def renew(self, batch_id: str, owner: str, now: float, lease_s: float) -> str | None:
        """Extend ``owner``'s lease; the batch's status, or None when it is not ``owner``'s."""

        def extend(db: sqlite3.Connection) -> str | None:
            cursor = db.execute(
                "UPDATE batches SET lease_until = ? WHERE id = ? AND owner = ?",
                (now + lease_s, batch_id, owner),
            )
            if cursor.rowcount == 0:
                return None
            row = db.execute("SELECT status FROM batches WHERE id = ?", (batch_id,)).fetchone()
            return str(row[0]) if row else None

        return await self._run(extend)

    async def release(self, batch_id: str, owner: str) -> None:
        def free(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE batches SET owner = NULL, lease_until = 0 WHERE id = ? AND owner = ?",
                (batch_id, owner),
            )

        await self._run(free)

    async def pending(self, batch_id: str, limit: int, above: int = -1) -> list[Line]:
        """Lines with no result yet, in input order, after line ``above``."""

        def read(db: sqlite3.Connection) -> list[Line]:
            rows = db.execute(
                "SELECT n, custom_id, body FROM lines WHERE batch_id = ? AND result IS NULL "
                "AND n > ? ORDER BY n LIMIT ?",
                (batch_id, above, limit),
            )
            return [Line(n, custom_id, bytes(body)) for n, custom_id, body in rows]

        return await self._run(read)

    async def record(self, batch_id: str, n: int, result: bytes, ok: bool) -> bool:
        """Line ``n``'s output line, written once: False when it already had one."""

        def write(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "UPDATE lines SET result = ?, ok = ? WHERE batch_id = ? AND n = ? "
                "AND result IS NULL",
                (result, int(ok), batch_id, n),
            )
            return cursor.rowcount > 0

        return await self._run(write)

    async def counts(self, batch_id: str) -> tuple[int, int, int]:
        """(total, completed, failed) lines."""

        def read(db: sqlite3.Connection) -> tuple[int, int, int]:
            row = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(ok = 1), 0), COALESCE(SUM(ok = 0), 0) "
                "FROM lines WHERE batch_id = ?",
                (batch_id,),
            ).fetchone()
            return int(row[0]), int(row[1]), int(row[2])

        return await self._run(read)

    async def results(self, batch_id: str) -> tuple[bytes, bytes]:
        """The output file (lines that succeeded) and the error file, in input order."""

        def read(db: sqlite3.Connection) -> tuple[bytes, bytes]:
            good: list[bytes] = []
            bad: list[bytes] = []
            rows = db.execute(
                "SELECT result, ok FROM lines WHERE batch_id = ? AND result IS NOT NULL ORDER BY n",
                (batch_id,),
            )
            for result, ok in rows:
                (good if ok else bad).append(bytes(result))
            return _jsonl(good), _jsonl(bad)

        return await self._run(read)

    async def finish(self, batch: JSON, files: list[tuple[JSON, bytes]], tenant: str) -> None:
        """The batch's final state and its output files, in one transaction."""

        def write(db: sqlite3.Connection) -> None:
            with _transaction(db):
                for record, content in files:
                    db.execute(
                        "INSERT OR REPLACE INTO files (id, tenant, record, content, created_at) "
                        "VALUES (?,?,?,?,?)",
                        (record["id"], tenant, orjson.dumps(record), content,
                         record["created_at"]),
                    )  # fmt: skip
                db.execute(
                    "UPDATE batches SET record = ?, status = ?, owner = NULL WHERE id = ?",
                    (orjson.dumps(batch), batch["status"], batch["id"]),
                )

        await self._run(write)

    async def aclose(self) -> None:
        await self._file.aclose()

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        return await self._file.run(work)


class _transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, *_: object) -> None:
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")


def _loads(raw: str | bytes) -> JSON:
    value: JSON = orjson.loads(raw)
    return value


def _jsonl(lines: list[bytes]) -> bytes:
    return b"".join(line + b"\n" for line in lines)
