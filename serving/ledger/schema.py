"""The ledger's tables and their versions (plain versioned DDL through SQLAlchemy Core).

``usage``: one row per finished request; never prompt or completion text. ``prices``:
every price the gateways were configured with and when it took effect. ``ledger_schema``
holds the version reached; ``migrate`` runs the steps after it, each in a transaction.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    insert,
    select,
)
from sqlalchemy.engine import Connection

metadata = MetaData()

usage = Table(
    "usage",
    metadata,
    Column("id", String(32), primary_key=True),  # random per row: a re-sent batch is a no-op
    Column("ts", Float, nullable=False, index=True),  # unix time the request ended
    Column("day", String(10), nullable=False),  # its UTC date, YYYY-MM-DD
    Column("request_id", String(128), nullable=False),
    Column("key_id", String(64), nullable=False, index=True),
    Column("team", String(64), nullable=True, index=True),
    Column("model", String(128), nullable=False),
    Column("version", String(128), nullable=False),
    Column("route", String(64), nullable=False),
    Column("stream", Boolean, nullable=False),
    Column("status", Integer, nullable=False),
    Column("error", String(64), nullable=True),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("cached_tokens", Integer, nullable=False),
    Column("cost_nano", BigInteger, nullable=False),  # nano-dollars
    Column("cost_basis", String(16), nullable=False),  # usage|partial|reserved|none|unpriced
    Column("latency_ms", Float, nullable=False),
)

prices = Table(
    "prices",
    metadata,
    Column("model", String(128), nullable=False),
    Column("version", String(128), nullable=False),
    Column("since", Float, nullable=False),  # unix time it takes effect
    Column("prompt_per_m", Float, nullable=False),  # dollars per million tokens
    Column("completion_per_m", Float, nullable=False),
    Column("cached_per_m", Float, nullable=False),
    Column("recorded", Float, nullable=False),
    UniqueConstraint("model", "version", "since", name="prices_once"),
)

schema_version = Table("ledger_schema", metadata, Column("version", Integer, nullable=False))


def _v1(conn: Connection) -> None:
    metadata.create_all(conn, tables=[usage, prices])


MIGRATIONS: list[Callable[[Connection], None]] = [_v1]  # step i takes version i to i + 1


def migrate(conn: Connection) -> int:
    """Bring the schema to the last version; the version it is at."""
    metadata.create_all(conn, tables=[schema_version])
    found = conn.execute(select(schema_version.c.version)).scalar()
    current = int(found or 0)
    if found is None:
        conn.execute(insert(schema_version).values(version=0))
    for step in MIGRATIONS[current:]:
        step(conn)
        current += 1
        conn.execute(schema_version.update().values(version=current))
    return current
