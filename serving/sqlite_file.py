"""One SQLite file used from the event loop: a single connection, opened on first use in
WAL mode with the caller's set-up statements, every call made in a thread under one lock
(sqlite3 blocks), and sqlite3's or the OS's errors raised as the caller's own error (a
503 in the error table), so no store writes this plumbing again."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class SqliteFile:
    def __init__(
        self,
        path: Path,
        *,
        timeout_s: float,
        setup: Sequence[str],
        unavailable: Callable[[str], Exception],
    ) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self.setup = tuple(setup)  # run once on the new connection, after WAL is on
        self.unavailable = unavailable  # (the error's type name) -> the error to raise
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SqliteFile(path={str(self.path)!r})"

    async def run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def locked() -> T:
            with self._lock:
                return work(self._open())

        try:
            return await asyncio.to_thread(locked)
        except (sqlite3.Error, OSError) as exc:
            raise self.unavailable(type(exc).__name__) from exc

    async def aclose(self) -> None:
        def shut() -> None:
            with self._lock:
                if self._db is not None:
                    self._db.close()
                    self._db = None

        await asyncio.to_thread(shut)

    def _open(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(
                self.path, timeout=self.timeout_s, check_same_thread=False, isolation_level=None
            )
            db.execute("PRAGMA journal_mode=WAL")
            for statement in self.setup:
                db.execute(statement)
            self._db = db
        return self._db
