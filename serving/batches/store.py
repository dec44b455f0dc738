"""Files and batches in one database: a SQLite file (WAL; the default, shared by the
gateway processes of one host) or PostgreSQL (``batches.database_url``, shared by every
gateway), through one SQL layer (``serving.batches.database``), opened on first use.

Three tables: ``files`` (uploads and the output/error files a batch writes, by tenant,
their bytes included: a BLOB, or a ``bytea`` in PostgreSQL, at most
``batches.max_file_bytes``), ``batches`` (the Batch object as JSON, its caller, and which
gateway process runs it: ``owner`` with a lease), and ``lines`` (a batch's input requests
and, once done, each one's output line). A batch is claimed by one process at a time
(one ``UPDATE ... RETURNING``: a row another process holds under a live lease is not
taken). A line's result is written once (``WHERE result IS NULL``) and a running batch
only takes lines without one, so no request runs again after its result was written,
whatever crashes. Calls run in a worker thread, off the event loop; the database's errors
become ``BatchesUnavailable`` (503) here.

A file's expiry is its File object's ``expires_at`` (indexed as an expression, so a store
written before expiry needs no migration): from then on the tenant's reads do not find it
(every read is given ``now``), and ``sweep`` deletes its row and bytes, except while an
unfinished batch names it as its input file (then at the first sweep after that batch
ends). A batch's ``caller`` holds what its runner needs that the Batch object does not
show: who created it, ``output_expires_s`` (its output files' lifetime) and
``input_bytes`` (its lines' bodies, while it runs).

A tenant's storage quota (``Quota``: bytes and files) is counted by the store itself, in
the transaction that writes, so gateways sharing it count the same: the bytes of its live
files (uploads and batch output, until they expire) and of its running batches' input
lines. ``put_file`` and ``create_batch`` raise ``StorageQuotaExceeded`` before writing
anything when the write would pass it; ``finish`` always writes a batch's output files
(work done is never thrown away: a tenant may go over its quota by them, and its uploads
and batches are refused until it deletes files) and drops the batch's lines, whose
results are now in those files. In PostgreSQL a tenant's quota-counted writes take turns
(a transaction-scoped advisory lock on the tenant), so two gateways cannot both see room
for one; SQLite's writes take turns already (``BEGIN IMMEDIATE``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import orjson
from sqlalchemy import TextClause, bindparam, text
from sqlalchemy.engine import Connection

from serving.batches.database import Database, Dialect
from serving.errors import BatchesUnavailable, StorageQuotaExceeded
from serving.sql_text import keyable

T = TypeVar("T")
JSON = dict[str, Any]
RUNNING = ("validating", "in_progress", "finalizing", "cancelling")
_RUNNING = ", ".join(f"'{status}'" for status in RUNNING)
QUOTA_LOCK = 7243024  # pg_advisory_xact_lock(QUOTA_LOCK, hashtext(tenant)): its writes in turn


def schema(d: Dialect) -> list[str]:
    expires = d.number("record", "expires_at")
    return [
        "CREATE TABLE IF NOT EXISTS files (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, "
        f"record TEXT NOT NULL, content {d.blob} NOT NULL, created_at {d.big} NOT NULL)",
        "CREATE INDEX IF NOT EXISTS files_tenant ON files (tenant, created_at)",
        f"CREATE INDEX IF NOT EXISTS files_expiry ON files ({expires}) WHERE {expires} IS NOT NULL",
        "CREATE TABLE IF NOT EXISTS batches (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, "
        "record TEXT NOT NULL, caller TEXT NOT NULL, status TEXT NOT NULL, "
        f"owner TEXT, lease_until {d.real} NOT NULL DEFAULT 0, created_at {d.big} NOT NULL)",
        "CREATE INDEX IF NOT EXISTS batches_tenant ON batches (tenant, created_at)",
        "CREATE INDEX IF NOT EXISTS batches_status ON batches (status)",
        "CREATE TABLE IF NOT EXISTS lines (batch_id TEXT NOT NULL, n INTEGER NOT NULL, "
        f"custom_id TEXT NOT NULL, body {d.blob} NOT NULL, result {d.blob}, ok INTEGER, "
        "PRIMARY KEY (batch_id, n))",
        "CREATE INDEX IF NOT EXISTS lines_pending ON lines (batch_id, result) WHERE result IS NULL",
    ]


@dataclass(frozen=True, slots=True)
class Line:
    n: int  # its place in the input file, from 0
    custom_id: str
    body: bytes  # the request's body (JSON)


@dataclass(frozen=True, slots=True)
class Claimed:
    batch: JSON
    caller: JSON


@dataclass(frozen=True, slots=True)
class Usage:
    bytes: int  # live files' bytes and running batches' input lines'
    files: int  # live files


@dataclass(frozen=True, slots=True)
class Quota:
    """What one tenant may keep stored (``batches.max_tenant_bytes``, ``max_tenant_files``)."""

    max_bytes: int
    max_files: int

    def check(self, usage: Usage, more_bytes: int, more_files: int, what: str) -> None:
        """Raise ``StorageQuotaExceeded`` when ``what`` (adding ``more_bytes`` in
        ``more_files`` files) would take ``usage`` past the quota."""
        if more_files and usage.files + more_files > self.max_files:
            raise StorageQuotaExceeded(
                f"You have exceeded your file storage quota: this key stores {usage.files} "
                f"files, at most {self.max_files} (batches.max_tenant_files). Delete files "
                "(DELETE /v1/files/{file_id}) or wait for them to expire."
            )
        if usage.bytes + more_bytes > self.max_bytes:
            raise StorageQuotaExceeded(
                f"You have exceeded your file storage quota: this key stores {usage.bytes} "
                f"bytes and {what} needs {more_bytes} more; at most {self.max_bytes} "
                "(batches.max_tenant_bytes). Delete files (DELETE /v1/files/{file_id}) or "
                "wait for them, or running batches, to end."
            )


class BatchStore:
    def __init__(self, target: Path | str, *, timeout_s: float = 5.0) -> None:
        """``target``: a SQLite file, or a ``postgresql://`` URL."""
        self._db = Database(
            target if isinstance(target, str) else target.expanduser(),
            timeout_s=timeout_s,
            schema=schema,
            unavailable=lambda why: BatchesUnavailable(f"The batch store is unavailable ({why})."),
        )
        d = self._db.dialect
        self.dialect = d.name
        expires = d.number("record", "expires_at")
        self._expired = f"{expires} <= :now"
        self._live = f"({expires} IS NULL OR {expires} > :now)"  # not expired at ``now``
        self._source = d.string("record", "input_file_id")
        self._usage_files = _sql(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(content)), 0) FROM files "
            f"WHERE tenant = :tenant AND {self._live}"
        )
        input_bytes = d.number("caller", "input_bytes")
        self._usage_lines = _sql(
            f"SELECT COALESCE(SUM({input_bytes}), 0) FROM batches "
            f"WHERE tenant = :tenant AND status IN ({_RUNNING})"
        )

    def __repr__(self) -> str:
        return f"BatchStore({self._db!r})"

    # -- files ----------------------------------------------------------------------

    async def put_file(
        self, tenant: str, record: JSON, content: bytes, quota: Quota | None = None
    ) -> None:
        """Store the file; with ``quota``, only if the tenant has room for it (else
        ``StorageQuotaExceeded``, nothing written), counted in this transaction."""

        def write(db: Connection) -> None:
            if quota is not None:
                usage = self._usage(db, tenant, record["created_at"])
                quota.check(usage, len(content), 1, "this file")
            db.execute(
                _sql("INSERT INTO files (id, tenant, record, content, created_at) "
                     "VALUES (:id, :tenant, :record, :content, :created_at)"),
                {"id": record["id"], "tenant": tenant, "record": _dumps(record),
                 "content": content, "created_at": record["created_at"]},
            )  # fmt: skip

        await self._db.run(write)

    async def usage(self, tenant: str, now: float) -> Usage:
        """What the tenant stores at ``now`` (for a refusal before any work; the write's
        own transaction counts again)."""
        return await self._db.run(lambda db: self._usage(db, tenant, now, lock=False), write=False)

    def _usage(self, db: Connection, tenant: str, now: float, *, lock: bool = True) -> Usage:
        if lock:
            self._lock(db, tenant)
        files, stored = db.execute(self._usage_files, {"tenant": tenant, "now": now}).one()
        running = db.execute(self._usage_lines, {"tenant": tenant}).scalar_one()
        return Usage(bytes=int(stored) + int(running), files=int(files))

    def _lock(self, db: Connection, tenant: str) -> None:
        """PostgreSQL: the tenant's quota-counted writes take turns, until this transaction
        ends (SQLite's writes take turns already)."""
        if self.dialect == "postgresql":
            db.execute(_sql("SELECT pg_advisory_xact_lock(:ns, hashtext(:tenant))"),
                       {"ns": QUOTA_LOCK, "tenant": tenant})  # fmt: skip

    async def file(self, tenant: str, file_id: str, now: float) -> JSON | None:
        """The File object, unless it has expired at ``now``."""
        if not keyable(file_id):
            return None
        sql = _sql(f"SELECT record FROM files WHERE id = :id AND tenant = :tenant AND {self._live}")

        def read(db: Connection) -> JSON | None:
            row = db.execute(sql, {"id": file_id, "tenant": tenant, "now": now}).first()
            return _loads(row[0]) if row else None

        return await self._db.run(read, write=False)

    async def content(self, tenant: str, file_id: str, now: float) -> bytes | None:
        if not keyable(file_id):
            return None
        sql = _sql(
            f"SELECT content FROM files WHERE id = :id AND tenant = :tenant AND {self._live}"
        )

        def read(db: Connection) -> bytes | None:
            row = db.execute(sql, {"id": file_id, "tenant": tenant, "now": now}).first()
            return bytes(row[0]) if row else None

        return await self._db.run(read, write=False)

    async def files(
        self, tenant: str, purpose: str | None, limit: int, desc: bool, now: float
    ) -> list[JSON]:
        order = "DESC" if desc else "ASC"
        sql = _sql(
            f"SELECT record FROM files WHERE tenant = :tenant AND {self._live} "
            f"ORDER BY created_at {order}, id {order}"
        )

        def read(db: Connection) -> list[JSON]:
            found = []
            for (raw,) in db.execute(sql, {"tenant": tenant, "now": now}):
                record = _loads(raw)
                if purpose is None or record.get("purpose") == purpose:
                    found.append(record)
                    if len(found) >= limit:
                        break
            return found

        return await self._db.run(read, write=False)

    async def delete_file(self, tenant: str, file_id: str, now: float) -> bool:
        if not keyable(file_id):
            return False
        sql = _sql(f"DELETE FROM files WHERE id = :id AND tenant = :tenant AND {self._live}")

        def remove(db: Connection) -> bool:
            return db.execute(sql, {"id": file_id, "tenant": tenant, "now": now}).rowcount > 0

        return await self._db.run(remove)

    async def sweep(self, now: float, limit: int) -> int:
        """Delete up to ``limit`` files expired at ``now`` (row and bytes), none that an
        unfinished batch reads; how many were deleted."""
        sql = _sql(
            f"DELETE FROM files WHERE id IN (SELECT id FROM files WHERE {self._expired} "
            f"AND id NOT IN (SELECT {self._source} FROM batches WHERE status IN ({_RUNNING}) "
            f"AND {self._source} IS NOT NULL) LIMIT :limit)"
        )

        def remove(db: Connection) -> int:
            return db.execute(sql, {"now": now, "limit": limit}).rowcount

        return await self._db.run(remove)

    # -- batches --------------------------------------------------------------------

    async def create_batch(
        self,
        tenant: str,
        batch: JSON,
        caller: JSON,
        lines: Iterable[Line],
        quota: Quota | None = None,
    ) -> None:
        """The batch and its input lines, in one transaction; with ``quota``, only if the
        tenant has room for the lines' bodies (they count while the batch runs)."""
        lines = list(lines)
        size = sum(len(line.body) for line in lines)
        caller = caller | {"input_bytes": size}

        def write(db: Connection) -> None:
            if quota is not None and size:
                usage = self._usage(db, tenant, batch["created_at"])
                quota.check(usage, size, 0, "this batch's copy of its input")
            db.execute(
                _sql("INSERT INTO batches (id, tenant, record, caller, status, created_at) "
                     "VALUES (:id, :tenant, :record, :caller, :status, :created_at)"),
                {"id": batch["id"], "tenant": tenant, "record": _dumps(batch),
                 "caller": _dumps(caller), "status": batch["status"],
                 "created_at": batch["created_at"]},
            )  # fmt: skip
            rows = [{"batch_id": batch["id"], "n": line.n, "custom_id": line.custom_id,
                     "body": line.body} for line in lines]  # fmt: skip
            if rows:
                db.execute(
                    _sql("INSERT INTO lines (batch_id, n, custom_id, body) "
                         "VALUES (:batch_id, :n, :custom_id, :body)"),
                    rows,
                )  # fmt: skip

        await self._db.run(write)

    async def batch(self, tenant: str | None, batch_id: str) -> JSON | None:
        """The Batch object (any tenant's when ``tenant`` is None: the runner)."""
        if not keyable(batch_id):
            return None

        def read(db: Connection) -> JSON | None:
            if tenant is None:
                found = db.execute(
                    _sql("SELECT record FROM batches WHERE id = :id"), {"id": batch_id}
                ).first()
            else:
                found = db.execute(
                    _sql("SELECT record FROM batches WHERE id = :id AND tenant = :tenant"),
                    {"id": batch_id, "tenant": tenant},
                ).first()
            return _loads(found[0]) if found else None

        return await self._db.run(read, write=False)

    async def batches(self, tenant: str, limit: int, after: str | None) -> list[JSON]:
        """Newest first, ``limit`` of them after the batch ``after`` (one that cannot
        exist: from the newest)."""
        if after is not None and not keyable(after):
            after = None

        def read(db: Connection) -> list[JSON]:
            start = None
            if after is not None:
                start = db.execute(
                    _sql("SELECT created_at, id FROM batches WHERE id = :id AND tenant = :tenant"),
                    {"id": after, "tenant": tenant},
                ).first()
            if start is None:
                rows = db.execute(
                    _sql("SELECT record FROM batches WHERE tenant = :tenant "
                         "ORDER BY created_at DESC, id DESC LIMIT :limit"),
                    {"tenant": tenant, "limit": limit},
                )  # fmt: skip
            else:
                rows = db.execute(
                    _sql("SELECT record FROM batches WHERE tenant = :tenant AND "
                         "(created_at < :at OR (created_at = :at AND id < :id)) "
                         "ORDER BY created_at DESC, id DESC LIMIT :limit"),
                    {"tenant": tenant, "at": start[0], "id": start[1], "limit": limit},
                )  # fmt: skip
            return [_loads(raw) for (raw,) in rows]

        return await self._db.run(read, write=False)

    async def save(self, batch: JSON, *, unless: tuple[str, ...] = ()) -> bool:
        """Write the Batch object (and its status), unless its stored status is in
        ``unless`` (a cancel another process saw first); True when written."""
        guard = " AND status NOT IN :unless" if unless else ""
        sql = _sql(
            f"UPDATE batches SET record = :record, status = :status WHERE id = :id{guard}",
            *(("unless",) if unless else ()),
        )

        def write(db: Connection) -> bool:
            params: JSON = {"record": _dumps(batch), "status": batch["status"], "id": batch["id"]}
            if unless:
                params["unless"] = list(unless)
            return db.execute(sql, params).rowcount > 0

        return await self._db.run(write)

    async def claim(self, owner: str, now: float, lease_s: float) -> list[Claimed]:
        """Running batches this process now holds: its own, and those whose holder's
        lease ran out (a gateway that died or stopped). One statement: of two processes
        claiming at once, one takes a batch and the other then finds it held."""
        sql = _sql(
            "UPDATE batches SET owner = :owner, lease_until = :until "
            f"WHERE status IN ({_RUNNING}) "
            "AND (owner = :owner OR owner IS NULL OR lease_until < :now) "
            "RETURNING record, caller"
        )

        def take(db: Connection) -> list[Claimed]:
            rows = db.execute(sql, {"owner": owner, "until": now + lease_s, "now": now})
            return [Claimed(_loads(r), _loads(c)) for r, c in rows]

        return await self._db.run(take)

    async def renew(self, batch_id: str, owner: str, now: float, lease_s: float) -> str | None:
        """Extend ``owner``'s lease; the batch's status, or None when it is not ``owner``'s."""
        sql = _sql(
            "UPDATE batches SET lease_until = :until WHERE id = :id AND owner = :owner "
            "RETURNING status"
        )

        def extend(db: Connection) -> str | None:
            row = db.execute(sql, {"until": now + lease_s, "id": batch_id, "owner": owner}).first()
            return str(row[0]) if row else None

        return await self._db.run(extend)

    async def release(self, batch_id: str, owner: str) -> None:
        sql = _sql(
            "UPDATE batches SET owner = NULL, lease_until = 0 WHERE id = :id AND owner = :owner"
        )

        def free(db: Connection) -> None:
            db.execute(sql, {"id": batch_id, "owner": owner})

        await self._db.run(free)

    async def pending(self, batch_id: str, limit: int, above: int = -1) -> list[Line]:
        """Lines with no result yet, in input order, after line ``above``."""
        sql = _sql(
            "SELECT n, custom_id, body FROM lines WHERE batch_id = :id AND result IS NULL "
            "AND n > :above ORDER BY n LIMIT :limit"
        )

        def read(db: Connection) -> list[Line]:
            rows = db.execute(sql, {"id": batch_id, "above": above, "limit": limit})
            return [Line(n, custom_id, bytes(body)) for n, custom_id, body in rows]

        return await self._db.run(read, write=False)

    async def record(self, batch_id: str, n: int, result: bytes, ok: bool) -> bool:
        """Line ``n``'s output line, written once: False when it already had one."""
        sql = _sql(
            "UPDATE lines SET result = :result, ok = :ok WHERE batch_id = :id AND n = :n "
            "AND result IS NULL"
        )

        def write(db: Connection) -> bool:
            params = {"result": result, "ok": int(ok), "id": batch_id, "n": n}
            return db.execute(sql, params).rowcount > 0

        return await self._db.run(write)

    async def counts(self, batch_id: str) -> tuple[int, int, int]:
        """(total, completed, failed) lines."""
        sql = _sql(
            "SELECT COUNT(*), COALESCE(SUM(CASE WHEN ok = 1 THEN 1 ELSE 0 END), 0), "
            "COALESCE(SUM(CASE WHEN ok = 0 THEN 1 ELSE 0 END), 0) "
            "FROM lines WHERE batch_id = :id"
        )

        def read(db: Connection) -> tuple[int, int, int]:
            row = db.execute(sql, {"id": batch_id}).one()
            return int(row[0]), int(row[1]), int(row[2])

        return await self._db.run(read, write=False)

    async def results(self, batch_id: str) -> tuple[bytes, bytes]:
        """The output file (lines that succeeded) and the error file, in input order."""
        sql = _sql(
            "SELECT result, ok FROM lines WHERE batch_id = :id AND result IS NOT NULL ORDER BY n"
        )

        def read(db: Connection) -> tuple[bytes, bytes]:
            good: list[bytes] = []
            bad: list[bytes] = []
            for result, ok in db.execute(sql, {"id": batch_id}):
                (good if ok else bad).append(bytes(result))
            return _jsonl(good), _jsonl(bad)

        return await self._db.run(read, write=False)

    async def finish(self, batch: JSON, files: list[tuple[JSON, bytes]], tenant: str) -> None:
        """The batch's final state and its output files, in one transaction, its lines
        dropped (their results are in the files); nothing when the stored batch has ended
        already (another process finished it)."""

        def write(db: Connection) -> None:
            if files:
                self._lock(db, tenant)
            ended = db.execute(
                _sql("UPDATE batches SET record = :record, status = :status, owner = NULL "
                     f"WHERE id = :id AND status IN ({_RUNNING})"),
                {"record": _dumps(batch), "status": batch["status"], "id": batch["id"]},
            ).rowcount  # fmt: skip
            if not ended:
                return
            for record, content in files:
                db.execute(
                    _sql("INSERT INTO files (id, tenant, record, content, created_at) "
                         "VALUES (:id, :tenant, :record, :content, :created_at) "
                         "ON CONFLICT (id) DO UPDATE SET tenant = excluded.tenant, "
                         "record = excluded.record, content = excluded.content, "
                         "created_at = excluded.created_at"),
                    {"id": record["id"], "tenant": tenant, "record": _dumps(record),
                     "content": content, "created_at": record["created_at"]},
                )  # fmt: skip
            db.execute(_sql("DELETE FROM lines WHERE batch_id = :id"), {"id": batch["id"]})

        await self._db.run(write)

    async def aclose(self) -> None:
        await self._db.aclose()


@lru_cache(maxsize=256)
def _sql(statement: str, *expanding: str) -> TextClause:
    """The statement, made once (``expanding``: parameters that are lists, for ``IN``)."""
    clause = text(statement)
    if expanding:
        clause = clause.bindparams(*(bindparam(name, expanding=True) for name in expanding))
    return clause


def _dumps(value: JSON) -> str:
    return orjson.dumps(value).decode()


def _loads(raw: str | bytes) -> JSON:
    value: JSON = orjson.loads(raw)
    return value


def _jsonl(lines: list[bytes]) -> bytes:
    return b"".join(line + b"\n" for line in lines)
