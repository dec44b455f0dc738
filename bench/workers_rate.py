"""Requests/s through ``weir serve --workers N`` in front of one mock engine (issue 26).

    python -m bench.workers_rate --workers 1 2 [--seconds 10] [--concurrency 64]

For each N: a mock engine (``bench.mock_engine``), N gateway workers on one port, then
``--concurrency`` closed-loop clients (aiohttp, one process) for ``--seconds`` after a
2 s warm-up; prints requests/s, p50/p99 latency and failures. The client shares the
machine's cores with the gateway: compare the rows with each other, on one host.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.config_builder import model, weir_toml
from bench.procs import start, stop_all, wait_for, weir_command

BODY = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


async def drive(url: str, seconds: float, concurrency: int) -> tuple[int, int, list[float]]:
    done, failed, took = 0, 0, []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        stop_at = time.monotonic() + seconds

        async def client() -> None:
            nonlocal done, failed
            while time.monotonic() < stop_at:
                t0 = time.perf_counter()
                async with session.post(url, json=BODY) as answer:
                    await answer.read()
                    ok = answer.status == 200
                took.append(time.perf_counter() - t0)
                done, failed = done + ok, failed + (not ok)

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return done, failed, took


def run(workers: int, seconds: float, concurrency: int, port: int, mock: int) -> str:
    work = Path(tempfile.mkdtemp(prefix="weir-workers-"))
    config = work / "weir.toml"
    config.write_text(weir_toml(
        gateway={"port": port}, limits={"enabled": False},
        observability={"access_log": False},
        models=[model("smollm2", "mock", url=f"http://127.0.0.1:{mock}")],
    ))  # fmt: skip
    gateway = start(
        [weir_command(), "--config", str(config), "serve", "--workers", str(workers),
         "--log-level", "WARNING"], work / "gateway.log",
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(f"{base}/readyz", 60)
        url = f"{base}/v1/chat/completions"
        asyncio.run(drive(url, 2.0, concurrency))
        done, failed, took = asyncio.run(drive(url, seconds, concurrency))
    finally:
        stop_all([gateway])
    q = statistics.quantiles(took, n=100)
    return (f"workers={workers} requests/s={done / seconds:.0f} p50={q[49] * 1000:.1f}ms"
            f" p99={q[98] * 1000:.1f}ms failed={failed}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--mock-port", type=int, default=9765)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="weir-mock-"))
    mock = start([sys.executable, "-m", "bench.mock_engine", "--port", str(args.mock_port)],
                 work / "mock.log")  # fmt: skip
    try:
        wait_for(f"http://127.0.0.1:{args.mock_port}/health", 30)
        for n in args.workers:
            print(run(n, args.seconds, args.concurrency, args.port, args.mock_port), flush=True)
    finally:
        stop_all([mock])


if __name__ == "__main__":
    main()
