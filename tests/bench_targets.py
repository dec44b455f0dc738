"""What the load-test suite's tests aim at: ``bench.mock_engine`` in its own process,
and ``weir serve`` in front of it (``bench.procs``), each on a free port."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.procs import free_port, gateway_config, start, start_gateway, stop_all, wait_for


@contextmanager
def mock_engine(logs: Path, *options: str) -> Iterator[str]:
    port = free_port()
    command = [sys.executable, "-m", "bench.mock_engine", "--port", str(port), *options]
    proc = start(command, logs / f"mock-{port}.log")
    try:
        wait_for(f"http://127.0.0.1:{port}/health", 30)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_all([proc])


@contextmanager
def gateway(engine_url: str, logs: Path, key: str) -> Iterator[str]:
    port = free_port()
    engine_port = int(engine_url.rsplit(":", 1)[1])
    proc: subprocess.Popen[bytes] = start_gateway(
        gateway_config(port, engine_port, logs, key=key), logs, f"gateway-{port}"
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/readyz", 60)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_all([proc])


def bench(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """``weir bench ...`` as a user runs it."""
    command = [sys.executable, "-m", "serving.cli", "bench", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
