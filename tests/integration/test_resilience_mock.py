"""Resilience over real sockets, with a mock engine: a hung upstream and an overload.

The gateway is ``weir serve``; the engine is ``bench.mock_engine`` (vLLM can't hang on
demand); the hang is a TCP proxy that stops forwarding bytes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.config_builder import model, weir_toml
from bench.overload import offer, start_rig, summary
from bench.procs import stop_all, wait_for
from tests import ports
from tests.tcp_proxy import TcpProxy


def config(port: int, logs: Path, engines: list[str]) -> str:
    return weir_toml(
        gateway={"port": port},
        engines={"log_dir": logs, "health_interval_s": 0.5},
        models=[
            model(
                "smollm2",
                "mock",
                urls=engines,
                routing={"breaker_failures": 3, "breaker_open_s": 2.0},
                timeouts={"ttft_s": 0.5},
            )
        ],
    )


STREAM: dict[str, Any] = {
    "model": "smollm2",
    "messages": [{"role": "user", "content": "Hi"}],
    "stream": True,
}


def engines(base: str) -> dict[str, dict[str, Any]]:
    return {e["replica"]: e for e in httpx.get(f"{base}/weir/engines").json()["data"]}


@pytest.fixture(scope="module")
def hung(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, TcpProxy]]:
    work = tmp_path_factory.mktemp("hang")
    engine, mock = ports.mock_engine(work)
    procs = [engine]
    proxy = TcpProxy(mock)
    try:
        wait_for(f"http://127.0.0.1:{mock}/health")
        engines = [f"http://127.0.0.1:{proxy.port}", f"http://127.0.0.1:{mock}"]
        gateway, base = ports.gateway(lambda port: config(port, work, engines), work, "gateway")
        procs.append(gateway)
        wait_for(f"{base}/readyz", 60)
        yield base, proxy
    finally:
        stop_all(procs)
        proxy.stop()


def test_hung_upstream_trips_ttft_then_the_breaker_and_comes_back(
    hung: tuple[str, TcpProxy],
) -> None:
    base, proxy = hung
    proxy.frozen.set()  # replica #0 now swallows every byte: connected, but silent
    timings = []
    for _ in range(8):
        started = time.monotonic()
        answer = httpx.post(f"{base}/v1/chat/completions", json=STREAM, timeout=30)
        timings.append(time.monotonic() - started)
        assert answer.status_code == 200
        assert answer.text.rstrip().endswith("data: [DONE]")
        assert '"error"' not in answer.text  # retried before the first byte: no one saw it
    view = engines(base)
    stuck = view["smollm2@mock#0"]
    assert stuck["breaker"] == "open"
    assert stuck["breaker_trips"] >= 1
    assert max(timings) < 2.0  # one TTFT timeout (0.5 s) and a retry, never a hang
    assert sum(t > 0.4 for t in timings) <= 3  # after the breaker opened: no more waiting
    print(f"\nhung replica: request times {[round(t, 2) for t in timings]} s")
    proxy.frozen.clear()
    served_before = stuck["requests"]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # half-open after 2 s; a probe succeeds; closed
        httpx.post(f"{base}/v1/chat/completions", json=STREAM, timeout=30).raise_for_status()
        now = engines(base)["smollm2@mock#0"]
        if now["breaker"] == "closed" and now["requests"] > served_before:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"replica #0 never came back: {engines(base)}")


def test_overload_at_five_times_capacity_is_refused_fast_with_bounded_memory(
    tmp_path: Path,
) -> None:
    in_flight, queue, engine_ms = 4, 8, 200
    procs, base, pid = start_rig(tmp_path, engine_ms, in_flight, queue)
    capacity = in_flight / (engine_ms / 1000)
    try:
        outcome = asyncio.run(offer(base, capacity * 5, 6.0, pid))
    finally:
        stop_all(procs)
    result = summary(outcome, capacity * 5, 6.0)
    print(f"\noverload at 5x: {result}")
    assert set(outcome.latencies) <= {200, 503}
    assert outcome.errors == 0
    assert len(outcome.latencies.get(503, [])) > len(outcome.latencies.get(200, []))
    assert result["max_queued"] <= queue
    assert result["max_in_flight"] <= in_flight
    assert result["refused_p50_ms"] < 100  # refusals are immediate, not queue timeouts
    assert result["rss_peak_mb"] - result["rss_start_mb"] < 50
