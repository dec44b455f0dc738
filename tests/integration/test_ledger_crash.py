"""The usage ledger loses nothing while its PostgreSQL crashes: ``weir serve`` in front of
a mock engine with its ledger in a real PostgreSQL that is SIGKILLed mid-run and
restarted (``bench.ledger_crash``; the 10,000-request, two-crash figure comes from
``python -m bench.ledger_crash``, this sends 1,000 with one crash).

No request fails for it, the database ends with one row per request, and its token
totals equal ``tokens_used_total`` on ``/metrics`` and the usage report.
"""

from __future__ import annotations

from pathlib import Path

from bench.ledger_crash import gateway_toml, run
from bench.procs import stop_all, wait_for
from tests import ports
from tests.postgres_server import PostgresServer

REQUESTS = 1000


class Crashable:
    """The test's PostgreSQL; a restart is a new server on the same port and data."""

    def __init__(self, server: PostgresServer) -> None:
        self.server = server
        self.url = server.url

    def kill(self) -> None:
        self.server.kill()

    def restart(self) -> Crashable:
        self.server = self.server.restart()
        return self


def test_ledger_keeps_every_row_through_a_postgres_crash(tmp_path: Path) -> None:
    database = Crashable(PostgresServer(tmp_path))
    engine, mock = ports.mock_engine(tmp_path)
    procs = [engine]
    try:
        wait_for(f"http://127.0.0.1:{mock}/health", 30)
        # its own spill directory, as its weir.toml says (the session's env names a shared one)
        env = {"WEIR_LEDGER__SPILL_DIR": str(tmp_path / "spill")}
        gateway, url = ports.gateway(
            lambda port: gateway_toml(port, mock, tmp_path, database.url), tmp_path, "gateway",
            env=env,
        )  # fmt: skip
        procs.append(gateway)
        wait_for(f"{url}/readyz", 120)
        result = run(url, database, REQUESTS, kills=1)
    finally:
        stop_all(procs)
        database.server.stop()
        database.server.remove()
    assert result["wrong"] == [], result
    assert result["statuses"] == {200: REQUESTS}
    assert result["kills"] == 1
    assert result["crashes"][0]["backlog_peak"] > 0  # rows came while it was down
    db, metrics = result["database"], result["metrics"]
    assert db["rows"] == db["request_ids"] == REQUESTS
    assert (db["prompt_tokens"], db["completion_tokens"]) == (
        metrics["prompt_tokens"], metrics["completion_tokens"],
    )  # fmt: skip
    assert result["report"]["requests"] == REQUESTS
    print(
        f"\n{REQUESTS} requests, PostgreSQL killed once: {db['rows']} rows, tokens"
        f" {db['prompt_tokens']}+{db['completion_tokens']} = metrics; crash {result['crashes']}"
    )
