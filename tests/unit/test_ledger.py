"""The usage ledger against SQLite and a real PostgreSQL: rows written in batches, none
lost while the database is killed and restarted, spilled rows written by the next
process, and reports that add up."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr
from sqlalchemy import event, func, select

from serving.ledger.config import LedgerConfig
from serving.ledger.report import usage_report
from serving.ledger.schema import usage
from serving.ledger.writer import Ledger, Row, make_engine
from tests.postgres_server import PostgresServer


def row(i: int, *, key: str = "k1", team: str | None = "research") -> Row:
    return (
        os.urandom(12).hex(), time.time(), f"req-{i}", key, team, "smollm2", "135m-instruct",
        "/v1/chat/completions", False, 200, None, 5, 3, 1, 1000 + i, "usage", 1.5,
    )  # fmt: skip


def config(tmp_path: Path, url: str | None = None, **extra: object) -> LedgerConfig:
    fields: dict[str, object] = {"flush_interval_s": 0.05, "retry_s": 0.2, "timeout_s": 2}
    return LedgerConfig(
        url=SecretStr(url) if url else None, path=tmp_path / "ledger.db",
        spill_dir=tmp_path / "spill", **(fields | extra),
    )  # fmt: skip


def count(ledger: Ledger) -> int:
    with ledger.engine().connect() as conn:
        return int(conn.execute(select(func.count()).select_from(usage)).scalar() or 0)


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str | None]:
    if request.param == "sqlite":
        yield None
        return
    url: str = request.getfixturevalue("postgres_url")
    with Ledger(config(tmp_path, url)).engine().begin() as conn:  # a clean table per test
        conn.execute(usage.delete()) if conn.dialect.has_table(conn, "usage") else None
    yield url


def test_rows_are_written_in_batches_and_reports_add_up(
    tmp_path: Path, database: str | None
) -> None:
    ledger = Ledger(config(tmp_path, database, batch_rows=500))
    ledger.start()
    try:
        for i in range(2000):
            ledger.record(row(i, key="k1" if i % 2 else "k2", team=None if i % 4 == 0 else "t"))
        assert ledger.flush(30)
        assert count(ledger) == 2000
        assert ledger.backlog == 0
        report = usage_report(ledger.engine(), since=0, by="key")
        assert [(x.group, x.requests) for x in report.lines] == [("k1", 1000), ("k2", 1000)]
        assert report.total.cost_nano == sum(1000 + i for i in range(2000))
        assert report.total.prompt_tokens == 10_000
        assert report.total.cached_tokens == 2000
        team = usage_report(ledger.engine(), since=0, by="day", team="t")
        assert team.total.requests == 1500
        assert team.csv().splitlines()[0].startswith("day,requests,prompt_tokens")
    finally:
        ledger.close()


def test_postgres_killed_and_restarted_loses_no_row(tmp_path: Path) -> None:
    server = PostgresServer(tmp_path)
    ledger = Ledger(config(tmp_path, server.url, batch_rows=200, buffer_rows=500))
    ledger.start()
    try:
        sent = 0
        for cycle in range(2):
            for _ in range(1000):
                ledger.record(row(sent))
                sent += 1
            server.kill()  # rows keep coming while it is down: memory, then the spill file
            for _ in range(1500):
                ledger.record(row(sent))
                sent += 1
            deadline = time.monotonic() + 30
            while ledger._spilled == 0 and time.monotonic() < deadline:
                time.sleep(0.02)  # the writer has met the dead database and spilled
            assert ledger._spilled > 0, cycle
            server = server.restart()
        assert ledger.flush(60), ledger.backlog
        assert count(ledger) == sent == 5000
        assert not any((tmp_path / "spill").glob("*.jsonl")) or ledger._spilled == 0
    finally:
        ledger.close()
        server.stop()
        server.remove()


def test_rows_spilled_at_shutdown_are_written_by_the_next_process(tmp_path: Path) -> None:
    dead = config(tmp_path, "postgresql://weir@127.0.0.1:1/weir", timeout_s=1)
    first = Ledger(dead)
    first.start()
    for i in range(300):
        first.record(row(i))
    first.close()  # the database never answered: every row is in its spill file
    spilled = list((tmp_path / "spill").glob("spill-*.jsonl"))
    assert len(spilled) == 1
    assert len(spilled[0].read_bytes().splitlines()) == 300
    second = Ledger(config(tmp_path))  # SQLite, reachable
    second.start()
    try:
        second.record(row(1000))
        assert second.flush(30)
        deadline = time.monotonic() + 30
        while count(second) < 301 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert count(second) == 301
        assert not spilled[0].exists()
    finally:
        second.close()


def test_flush_returns_only_once_the_batch_on_its_way_is_committed(tmp_path: Path) -> None:
    # a slow database (each INSERT held 0.3 s): the batch the writer has taken out of
    # memory still counts until its transaction commits, so a report made after
    # flush() sees every row taken before it (a batch in flight once went uncounted)
    settings = config(tmp_path, batch_rows=100, flush_interval_s=0.01)
    engine = make_engine(settings)

    def slow(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO USAGE"):
            time.sleep(0.3)

    event.listen(engine, "before_cursor_execute", slow)
    ledger = Ledger(settings, engine=engine)
    ledger.start()
    try:
        for batch in range(3):
            for i in range(100):
                ledger.record(row(batch * 100 + i))
            assert ledger.backlog > 0
            assert ledger.flush(30)
            assert count(ledger) == (batch + 1) * 100
            assert ledger.backlog == 0
    finally:
        ledger.close()


def test_backlog_gauge_counts_a_row_as_soon_as_it_is_taken(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    ledger = Ledger(config(tmp_path, flush_interval_s=60), registry=registry)
    for i in range(5):
        ledger.record(row(i))  # no writer cycle has run since
    assert registry.get_sample_value("weir_ledger_backlog_rows") == 5
    ledger.start()
    try:
        assert ledger.flush(30)
        assert registry.get_sample_value("weir_ledger_backlog_rows") == 0
        assert count(ledger) == 5
    finally:
        ledger.close()


def test_a_key_or_team_no_row_can_hold_matches_none(tmp_path: Path, database: str | None) -> None:
    """A report's filter (``/weir/admin/usage?team=a%00b``) holding NUL, which PostgreSQL's
    text cannot hold, or a lone surrogate, which is no UTF-8: no row matches, never the
    database's error (a 500)."""
    ledger = Ledger(config(tmp_path, database))
    ledger.start()
    try:
        ledger.record(row(1))
        assert ledger.flush(10)
        engine = ledger.engine()
        for text in ("k1\x00", "\ud800"):
            for report in (usage_report(engine, since=0, key=text),
                           usage_report(engine, since=0, team=text, by="team")):  # fmt: skip
                assert (report.lines, report.total.requests) == ([], 0)
        assert usage_report(ledger.engine(), since=0, key="k1").total.requests == 1
    finally:
        ledger.close()
