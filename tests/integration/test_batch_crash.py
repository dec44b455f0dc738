"""The Batch API survives its gateway being killed: SIGKILL mid-batch three times.

``weir serve`` in front of ``bench.mock_engine`` (vLLM cannot be told how long to take),
the batch store in a SQLite file or in PostgreSQL (the session's server, a database of
the test's own); ``bench.batch_crash.run`` kills the gateway's process group at a
quarter, half and three quarters of the batch and starts a new one on the same store.
The batch completes and every input line has exactly one output line.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.batch_crash import config, run
from bench.procs import stop_all, wait_for
from tests import ports
from tests.retrieval_db import fresh_database


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """Where the batch store lives: '' for the SQLite file, else a fresh database."""
    if request.param == "sqlite":
        yield ""
        return
    with fresh_database(request.getfixturevalue("postgres_url")) as url:
        yield url


def test_sigkill_three_times_mid_batch(tmp_path: Path, database_url: str) -> None:
    """On PostgreSQL a second gateway shares the store throughout (as replicas do): the
    batch runs on whichever holds its lease, and each line is still answered once."""
    engine, mock = ports.mock_engine(tmp_path, "--slots", "8", "--delay-ms", "20")
    processes = [engine]
    try:
        wait_for(f"http://127.0.0.1:{mock}/health")
        starts = 0

        def starter(work: Path, mock: int) -> tuple[subprocess.Popen[bytes], str]:
            nonlocal starts
            starts += 1
            return ports.gateway(lambda port: config(port, mock, work, 1.0, database_url),
                                 work, f"gateway-{starts}")  # fmt: skip

        if database_url:
            peer, peer_base = starter(tmp_path, mock)
            processes.append(peer)
            wait_for(f"{peer_base}/readyz", 60)
        result = run(tmp_path, 300, 3, mock, starter)
    finally:
        stop_all(processes)
    assert result["status"] == "completed", result
    assert result["kills"] == 3
    assert result["output_lines"] == 300  # one line for each input line...
    assert (result["distinct"], result["duplicates"], result["missing"]) == (300, 0, 0)
    assert result["request_counts"] == {"total": 300, "completed": 300, "failed": 0}
