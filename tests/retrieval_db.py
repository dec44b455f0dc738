"""A database of its own on the session's PostgreSQL, for one retrieval test."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg


@contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    """A new, empty database on the server of ``server_url`` (tests.postgres_server's
    ``postgres_url``): its URL, for the block; dropped after it. A block that leaves a
    ``Retrieval`` following (not closed) fails: its thread would outlive the database."""
    base, _, _ = server_url.rpartition("/")
    name = f"retrieval_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{base}/{name}"
        following = [t for t in threading.enumerate() if t.name == "retrieval-follower"]
        assert not following, (
            "a Retrieval service still follows its docstore: close() it before its database"
            " is dropped, or its follower logs the missing database for the rest of the run"
        )
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
