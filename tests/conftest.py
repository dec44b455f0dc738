from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.postgres_server import PostgresServer
from tests.redis_server import RedisServer


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session", autouse=True)
def ledger_in_temp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Gateways the tests make (in process or ``weir serve``) keep their usage ledger in
    the session's temp dir, never in the user's ~/.local/share/weir."""
    where = tmp_path_factory.mktemp("ledger")
    names = {"WEIR_LEDGER__PATH": where / "ledger.db", "WEIR_LEDGER__SPILL_DIR": where / "spill"}
    before = {name: os.environ.get(name) for name in names}
    for name, path in names.items():
        os.environ.setdefault(name, str(path))
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server for the whole session."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real PostgreSQL for the whole session (tests.postgres_server): its URL,
    postgresql://weir@127.0.0.1:PORT/weir. Tests share the database: use tables or
    schemas of your own."""
    server = PostgresServer(tmp_path_factory.mktemp("postgres"))
    try:
        yield server.url
    finally:
        server.stop()
        server.remove()
