"""The PostgreSQL the tests start: reachable at its URL, moves off a taken port, and a
crash (kill) then restart keeps what was committed."""

from __future__ import annotations

import socket
from pathlib import Path

import psycopg

from tests import ports
from tests.postgres_server import PostgresServer


def test_postgres_url_accepts_connections(postgres_url: str) -> None:
    with psycopg.connect(postgres_url) as conn:
        row = conn.execute("SELECT current_database(), current_user").fetchone()
    assert row == ("weir", "weir")


def test_moves_off_a_taken_port_and_keeps_committed_rows_across_a_crash(
    tmp_path: Path,
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        server = PostgresServer(tmp_path, pick=ports.taken_first(holder))
    try:
        assert server.port != taken
        assert "already in use" in (tmp_path / f"postgres-{taken}.log").read_text()
        with psycopg.connect(server.url, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (x int)")
            conn.execute("INSERT INTO t VALUES (1), (2)")
        server.kill()
        try:
            psycopg.connect(server.url, connect_timeout=2).close()
            reachable = True
        except psycopg.OperationalError:
            reachable = False
        assert not reachable
        server = server.restart()
        with psycopg.connect(server.url) as conn:
            assert conn.execute("SELECT x FROM t ORDER BY x").fetchall() == [(1,), (2,)]
    finally:
        server.stop()
        server.remove()
