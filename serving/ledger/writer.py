"""``Ledger``: usage rows taken on the hot path, written by a thread in batches.

``record`` appends one tuple to a deque (no lock, no I/O) and, once a batch is waiting,
wakes the writer thread; that is all a request pays. The thread writes batches of
``batch_rows`` with ``INSERT ... ON CONFLICT DO NOTHING`` (each row has a random id, so
a batch sent again after a lost commit adds nothing), every ``flush_interval_s`` at most.

A database that is down or slow never fails a request: a failed batch, and every row
beyond ``buffer_rows`` held in memory, is appended to this process's spill file (one JSON
line per row, fsynced) and written from there once the database answers again (tried
every ``retry_s``). Spill files are per process (``spill-<pid>-<start>.jsonl``, held
under an exclusive ``flock``); at start, and whenever the database is back, the writer
also drains the files no live process holds: what a stopped gateway left behind. On
``close`` the rows still in memory go to the database, or to the spill file when it
cannot take them. ``backlog`` (memory + spilled rows) is the ``weir_ledger_backlog_rows``
gauge. Rows in memory are lost only if the process is killed before it spills them.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy import create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from serving.ledger.config import LedgerConfig
from serving.ledger.schema import migrate, prices, usage

log = logging.getLogger("weir.ledger")
Row = tuple[Any, ...]  # in the order of FIELDS
FIELDS = tuple(c.name for c in usage.columns if c.name != "day")
DB_ERRORS = (SQLAlchemyError, OSError)


def make_engine(config: LedgerConfig) -> Engine:
    url = config.database_url()
    if url.startswith("sqlite"):
        config.path.expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": config.timeout_s})
        event.listen(engine, "connect", _wal)
        return engine
    timeout_ms = int(config.timeout_s * 1000)
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=2,
        connect_args={
            "connect_timeout": max(1, int(config.timeout_s)),
            "options": f"-c statement_timeout={timeout_ms}",
        },
    )


def _wal(dbapi: Any, _: Any) -> None:
    dbapi.execute("PRAGMA journal_mode=WAL")  # readers (reports) never block the writer
    dbapi.execute("PRAGMA synchronous=NORMAL")


def new_row_id() -> str:
    """A row's id: its time in nanoseconds then 32 random bits, 24 hex digits. Ids grow
    with time, so each insert lands at the end of the primary-key index instead of at a
    random page of it (random ids cost 29 against 8 us of CPU per row in a 740,000-row
    SQLite ledger); a batch sent again still carries the same ids."""
    return f"{time.time_ns():016x}{random.getrandbits(32):08x}"  # reseeded in forks


COLUMNS = (*FIELDS, "day")
_TS = FIELDS.index("ts")
_SQL = "INSERT INTO usage ({}) VALUES ({}) ON CONFLICT (id) DO NOTHING"
DAY_S = 86_400


def insert_rows(engine: Engine, rows: Sequence[Row]) -> None:
    """One transaction; rows already there (same id) are skipped. The driver's own
    ``executemany`` with positional rows: no per-row statement compiled in Python (it held
    the GIL beside the event loop, about 14 % of a busy gateway's samples)."""
    mark = "%s" if engine.dialect.name == "postgresql" else "?"
    sql = _SQL.format(", ".join(COLUMNS), ", ".join([mark] * len(COLUMNS)))
    days: dict[int, str] = {}
    params = []
    for row in rows:
        epoch_day = int(row[_TS] // DAY_S)
        day = days.get(epoch_day)
        if day is None:
            day = days[epoch_day] = time.strftime("%Y-%m-%d", time.gmtime(epoch_day * DAY_S))
        params.append((*row, day))
    with engine.begin() as conn:
        conn.exec_driver_sql(sql, params)


class Ledger:
    def __init__(
        self,
        config: LedgerConfig,
        *,
        prices_in_effect: Sequence[dict[str, Any]] = (),
        registry: CollectorRegistry | None = None,
        engine: Engine | None = None,
    ) -> None:
        self.config = config
        self._engine = engine
        self._prices = list(prices_in_effect)
        self._rows: deque[Row] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Condition()
        self._thread: threading.Thread | None = None
        self._ready = False  # schema migrated, prices recorded
        self._down_until = 0.0
        self._spill_dir = config.spill_dir.expanduser()
        self._spill: IO[bytes] | None = None
        self._spill_path: Path | None = None
        self._spilled = 0  # rows in spill files not yet written
        self._writing = 0  # rows taken from memory, not yet committed or spilled
        self._pending_others = True  # other processes' spill files to drain
        self.written = 0
        self._batch = config.batch_rows
        self.backlog_gauge = Gauge(
            "weir_ledger_backlog_rows",
            "Usage rows not yet in the ledger database (memory + spill files)",
            registry=registry,
        )
        # read when scraped, so a row taken since the writer's last cycle counts at once
        # (with several worker processes the files hold what each cycle last set)
        self.backlog_gauge.set_function(lambda: self.backlog)
        self.written_total = Counter(
            "weir_ledger_rows_written", "Usage rows written to the ledger database",
            registry=registry,
        )  # fmt: skip
        self.failures_total = Counter(
            "weir_ledger_write_failures", "Ledger batches the database did not take",
            registry=registry,
        )  # fmt: skip
        self.spilled_total = Counter(
            "weir_ledger_spilled_rows", "Usage rows written to a spill file", registry=registry
        )

    def __repr__(self) -> str:
        return f"Ledger(url={self.config.database_url().split('@')[-1]!r})"

    # ---- the hot path

    def record(self, row: Row) -> None:
        """Take one finished request's row (``FIELDS`` order); never blocks, never raises."""
        rows = self._rows
        rows.append(row)
        if len(rows) == self._batch:
            self._wake.set()

    # ---- life

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="weir-ledger", daemon=True)
        self._thread.start()

    def close(self, timeout_s: float = 30.0) -> None:
        """Write (or spill) everything held, then stop the thread."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        else:
            self._final()
        if self._engine is not None:
            self._engine.dispose()

    @property
    def backlog(self) -> int:
        """Rows not yet in the database: in memory, being written, in spill files (counted
        until committed: ``flush`` must not return while a batch is on its way)."""
        return len(self._rows) + self._writing + self._spilled

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Until every row taken so far is in the database (reports call it first);
        False when that did not happen in time (the database is down)."""
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while self.backlog:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None:
                    return False
                self._wake.set()
                self._idle.wait(min(left, 0.1))
        return True

    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = make_engine(self.config)
        return self._engine

    # ---- the thread

    def _run(self) -> None:
        # what a stopped gateway left behind is written with the first rows
        self._pending_others = any(self._spill_dir.glob("spill-*.jsonl"))
        while not self._stop.is_set():
            self._wake.wait(self.config.flush_interval_s)
            self._wake.clear()
            try:
                self._cycle()
            except Exception:  # the thread must live on: say it, and go on next cycle
                log.exception("ledger writer cycle failed")
        self._final()

    def _cycle(self) -> None:
        if not self._rows and not self._spilled and not self._pending_others:
            return
        if time.monotonic() < self._down_until:
            self._spill_excess()
            return
        try:
            self._write_all()
        except DB_ERRORS as exc:
            self.failures_total.inc()
            self._down_until = time.monotonic() + self.config.retry_s
            log.warning("ledger database unavailable (%s); rows go to the spill file", _why(exc))
            self._spill_excess()
        finally:
            self._update()

    def _write_all(self) -> None:
        """Everything waiting into the database: spilled rows first, then memory's."""
        self._ensure_ready()
        if self._spilled or self._pending_others:
            self._drain_spills()
        while self._rows:
            self._send(self._take(self._batch))

    def _final(self) -> None:
        if not self._rows and not self._spilled:
            self._close_spill()
            return
        try:
            self._write_all()
        except DB_ERRORS as exc:
            log.warning("ledger database unavailable at shutdown (%s): rows spilled", _why(exc))
            self._spill_rows(self._take(len(self._rows)))
        finally:
            self._update()
            self._close_spill()

    def _close_spill(self) -> None:
        if self._spill is not None:
            self._spill.close()
            self._spill = None
            if self._spill_path is not None and not self._spilled:
                self._spill_path.unlink(missing_ok=True)

    def _ensure_ready(self) -> None:
        if self._ready:
            return
        dialect = None
        with self.engine().begin() as conn:
            migrate(conn)
            dialect = conn.dialect.name
        if self._prices:
            module = postgresql if dialect == "postgresql" else sqlite
            statement = module.insert(prices).on_conflict_do_nothing(
                index_elements=["model", "version", "since"]
            )
            with self.engine().begin() as conn:
                conn.execute(statement, self._prices)
        self._ready = True

    def _take(self, n: int) -> list[Row]:
        """Up to ``n`` rows out of memory, counted as being written until ``_send`` or
        ``_spill_rows`` is done with them."""
        rows = self._rows
        n = min(n, len(rows))
        self._writing += n  # before they leave the deque: the backlog never dips
        return [rows.popleft() for _ in range(n)]

    def _send(self, batch: list[Row]) -> None:
        """Insert rows from ``_take``; when the database fails they go to the spill file."""
        try:
            insert_rows(self.engine(), batch)
        except DB_ERRORS:
            self._spill_rows(batch)
            raise
        except BaseException:
            self._writing -= len(batch)
            raise
        self._writing -= len(batch)
        self._wrote(len(batch))

    def _wrote(self, n: int) -> None:
        self.written += n
        self.written_total.inc(n)

    def _update(self) -> None:
        self.backlog_gauge.set(self.backlog)
        with self._idle:
            self._idle.notify_all()

    # ---- spill files

    def _open_spill(self) -> IO[bytes]:
        self._spill_dir.mkdir(parents=True, exist_ok=True)
        path = self._spill_dir / f"spill-{os.getpid()}-{time.time_ns()}.jsonl"
        handle = path.open("ab")
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._spill, self._spill_path = handle, path
        return handle

    def _spill_excess(self) -> None:
        excess = len(self._rows) - self.config.buffer_rows
        if excess > 0 or (self._stop.is_set() and self._rows):
            self._spill_rows(self._take(max(excess, 0) or len(self._rows)))

    def _spill_rows(self, rows: Sequence[Row]) -> None:
        """Rows from ``_take`` to this process's spill file."""
        if not rows:
            return
        try:
            spill = self._spill or self._open_spill()
            spill.write(b"".join(orjson.dumps(r) + b"\n" for r in rows))
            spill.flush()
            os.fsync(spill.fileno())
            self._spilled += len(rows)
        finally:
            self._writing -= len(rows)
        self.spilled_total.inc(len(rows))

    def _drain_spills(self) -> None:
        """Write every spilled row: this process's file, then files no process holds."""
        if self._spill is not None and self._spill_path is not None and self._spilled:
            self._spill.flush()
            self._write_file(self._spill_path)
            self._spill.truncate(0)
            self._spill.seek(0)
            self._spilled = 0
        for path in sorted(self._spill_dir.glob("spill-*.jsonl")):
            if path == self._spill_path:
                continue
            with _unheld(path) as handle:
                if handle is None:
                    continue
                self._write_file(path)
                path.unlink()
        self._pending_others = False

    def _write_file(self, path: Path) -> None:
        batch: list[Row] = []
        with path.open("rb") as source:
            for line in source:
                try:
                    row = tuple(orjson.loads(line))
                    if len(row) != len(FIELDS):
                        raise ValueError(row)
                    batch.append(row)
                except (orjson.JSONDecodeError, ValueError, TypeError):
                    continue  # a line cut short by a crash mid-write: never a whole row
                if len(batch) >= self._batch:
                    insert_rows(self.engine(), batch)
                    self._wrote(len(batch))
                    batch = []
        if batch:
            insert_rows(self.engine(), batch)
            self._wrote(len(batch))
        log.info("ledger: wrote the rows spilled in %s", path.name)


@contextlib.contextmanager
def _unheld(path: Path) -> Iterator[IO[bytes] | None]:
    """``path`` opened and locked when no live process holds it, else None."""
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        yield None
        return
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        yield handle
    finally:
        handle.close()


def _why(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]
