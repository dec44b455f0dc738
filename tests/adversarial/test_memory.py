"""The gateway's memory after hostile bodies: bounded while they arrive, given back after.

Before: eight 3.9 MB prompts, eight lists of 2,000 long prompts and eight 4 MB bodies
that are not JSON took a gateway from 141 MB to 884 MB, and it stayed there (every
prompt of a list tokenized at once, glibc keeping what the counting threads freed). A real
``weir serve`` process in front of the mock engine, measured from outside.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import psutil
import pytest

from bench.config_builder import model, weir_toml
from bench.procs import stop_all, wait_for
from tests import ports

KEY = "sk-memory-tests"
PARALLEL = 8
GROWTH_MB = 128  # what the gateway may keep after the burst over its warm size (before: +740;
# after: +23 on a quiet machine, +92 with eight other test processes on the two cores)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, psutil.Process]]:
    work = tmp_path_factory.mktemp("memory")
    mock, mock_port = ports.mock_engine(work)

    def config(port: int) -> str:
        return weir_toml(
            gateway={"port": port, "api_keys": [KEY], "memory_trim_interval_s": 1},
            engines={"log_dir": work},
            models=[model("smollm2", "mock", url=f"http://127.0.0.1:{mock_port}",
                          engine_args=["--max-model-len", "2048"],
                          tokenizer="smollm2-135m-instruct")],
        )  # fmt: skip

    procs = [mock]
    try:
        served, base = ports.gateway(
            config, work, "gateway", weir=[sys.executable, "-m", "serving.cli"]
        )
        procs.append(served)
        wait_for(f"{base}/readyz", 120)
        yield int(base.rsplit(":", 1)[1]), psutil.Process(served.pid)
    finally:
        stop_all(procs)


def post(port: int, path: str, body: bytes) -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=body,
        headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def burst(port: int, path: str, body: bytes) -> list[int]:
    statuses: list[int] = []
    threads = [
        threading.Thread(target=lambda: statuses.append(post(port, path, body)))
        for _ in range(PARALLEL)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


def rss_mb(process: psutil.Process) -> float:
    return float(process.memory_info().rss) / 2**20


def test_memory_is_bounded_under_hostile_bodies_and_given_back(
    gateway: tuple[int, psutil.Process],
) -> None:
    port, process = gateway
    hello = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(20):
        assert post(port, "/v1/chat/completions", json.dumps(hello).encode()) == 200
    warm = rss_mb(process)
    hostile = [
        ("/v1/chat/completions",
         json.dumps({"model": "smollm2", "messages": [{"role": "user",
                     "content": "word " * 780_000}]}).encode()),
        ("/v1/completions",
         json.dumps({"model": "smollm2", "prompt": ["x " * 900] * 2000,
                     "max_tokens": 1}).encode()),
        ("/v1/chat/completions", b"{" + b"a" * 4_000_000),
    ]  # fmt: skip
    peak = warm
    for _ in range(2):
        for path, body in hostile:
            statuses = burst(port, path, body)
            assert all(400 <= s < 600 for s in statuses), statuses  # refused, never hung
            assert 500 not in statuses
            peak = max(peak, rss_mb(process))
    deadline = time.monotonic() + 30
    while rss_mb(process) > warm + GROWTH_MB:
        assert time.monotonic() < deadline, (
            f"RSS {rss_mb(process):.0f} MB, warm {warm:.0f} MB, peak {peak:.0f} MB"
        )
        time.sleep(0.5)
    assert peak < warm + 400, f"peak {peak:.0f} MB over warm {warm:.0f} MB"
    # still serving: the mock engine may have failed the 2,000-prompt lists (a 502 opens
    # the breaker for its cool-down), so the gateway gets until then to answer again
    deadline = time.monotonic() + 60
    while post(port, "/v1/chat/completions", json.dumps(hello).encode()) != 200:
        assert time.monotonic() < deadline, "the gateway did not serve again"
        time.sleep(0.5)
