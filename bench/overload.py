"""Overload: offer several times a model's capacity and watch the bulkhead hold.

Starts a mock engine that takes ``--engine-ms`` per answer and ``weir serve`` in front
of it with a small bulkhead (``--in-flight`` requests, ``--queue`` waiting, 1 s wait
limit), so capacity is ``in_flight / engine_s`` requests/s. Then sends an open-loop
Poisson stream at ``--factor`` times that capacity for ``--seconds``, sampling the gateway's
RSS and its bulkhead (``/weir/engines``) as it goes. Reports successes, how fast the
refusals (503 ``engine_overloaded``) came back, the deepest queue seen and peak RSS.

Black-box: ``weir`` as a command, HTTP, and the process's RSS from psutil.

    python -m bench.overload --factor 5 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from rich.console import Console
from rich.table import Table

from bench.config_builder import model, weir_toml
from bench.procs import free_port, start, start_gateway, stop_all, wait_for


def config(port: int, mock: int, logs: Path, *, in_flight: int, queue: int) -> str:
    routing = {"max_in_flight": in_flight, "max_queue": queue, "queue_timeout_s": 1.0}
    return weir_toml(
        gateway={"port": port},
        engines={"log_dir": logs},
        models=[model("smollm2", "mock", url=f"http://127.0.0.1:{mock}", routing=routing)],
    )


BODY = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}


def pct(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


@dataclass
class Outcome:
    latencies: dict[int, list[float]] = field(default_factory=dict)  # status -> seconds
    errors: int = 0
    max_queued: int = 0
    max_in_flight: int = 0
    rss_mb: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0  # first arrival to last answer


async def offer(base: str, rate: float, seconds: float, pid: int, seed: int = 1) -> Outcome:
    """Poisson arrivals at ``rate``/s for ``seconds`` against ``base``, sampling as it goes."""
    outcome = Outcome()
    rng = random.Random(seed)
    process = psutil.Process(pid)
    connector = aiohttp.TCPConnector(limit=2000)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as client:

        async def one() -> None:
            started = time.perf_counter()
            try:
                async with client.post(f"{base}/v1/chat/completions", json=BODY) as answer:
                    await answer.read()
                    status = answer.status
            except (aiohttp.ClientError, TimeoutError):
                outcome.errors += 1
                return
            elapsed = time.perf_counter() - started
            outcome.latencies.setdefault(status, []).append(elapsed)

        async def sample(stop: float) -> None:
            while time.perf_counter() < stop:
                outcome.rss_mb.append(process.memory_info().rss / 2**20)
                async with client.get(f"{base}/weir/engines") as answer:
                    view = await answer.json()
                for bulkhead in view["bulkheads"]:
                    outcome.max_queued = max(outcome.max_queued, bulkhead["queued"])
                    outcome.max_in_flight = max(outcome.max_in_flight, bulkhead["in_flight"])
                await asyncio.sleep(0.1)

        began = time.perf_counter()
        stop = began + seconds
        sampler = asyncio.create_task(sample(stop))
        tasks = []
        next_at = time.perf_counter()
        while next_at < stop:
            delay = next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
            next_at += rng.expovariate(rate)
        await asyncio.gather(*tasks)
        outcome.elapsed_s = time.perf_counter() - began
        await sampler
    return outcome


def start_rig(work: Path, engine_ms: int, in_flight: int, queue: int) -> tuple[list[Any], str, int]:
    mock = free_port()
    port = free_port()
    procs = [
        start(
            [sys.executable, "-m", "bench.mock_engine", "--port", str(mock),
             "--delay-ms", str(engine_ms)],
            work / "mock.log",
        )
    ]  # fmt: skip
    text = config(port, mock, work, in_flight=in_flight, queue=queue)
    procs.append(start_gateway(text, work, "gateway"))
    base = f"http://127.0.0.1:{port}"
    wait_for(f"http://127.0.0.1:{mock}/health")
    wait_for(f"{base}/readyz")
    return procs, base, procs[1].pid


def summary(outcome: Outcome, rate: float, seconds: float) -> dict[str, Any]:
    ok = outcome.latencies.get(200, [])
    refused = outcome.latencies.get(503, [])
    return {
        "offered_rps": rate,
        "seconds": seconds,
        "statuses": {str(k): len(v) for k, v in sorted(outcome.latencies.items())},
        "transport_errors": outcome.errors,
        "served_rps": len(ok) / outcome.elapsed_s if outcome.elapsed_s else None,
        "ok_p50_ms": pct(ok, 50) * 1000 if ok else None,
        "ok_p99_ms": pct(ok, 99) * 1000 if ok else None,
        "refused_p50_ms": pct(refused, 50) * 1000 if refused else None,
        "refused_p99_ms": pct(refused, 99) * 1000 if refused else None,
        "max_queued": outcome.max_queued,
        "max_in_flight": outcome.max_in_flight,
        "rss_start_mb": outcome.rss_mb[0] if outcome.rss_mb else None,
        "rss_peak_mb": max(outcome.rss_mb) if outcome.rss_mb else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--factor", type=float, default=5.0, help="offered load / capacity")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--engine-ms", type=int, default=200)
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument("--queue", type=int, default=16)
    parser.add_argument("--out", default="bench-results/overload.json")
    args = parser.parse_args()
    capacity = args.in_flight / (args.engine_ms / 1000)
    rate = capacity * args.factor
    work = Path(tempfile.mkdtemp(prefix="weir-bench-"))
    procs, base, pid = start_rig(work, args.engine_ms, args.in_flight, args.queue)
    try:
        print(f"capacity {capacity:.0f} req/s; offering {rate:.0f} req/s for {args.seconds:g}s")
        outcome = asyncio.run(offer(base, rate, args.seconds, pid))
    finally:
        stop_all(procs)
    result = summary(outcome, rate, args.seconds)
    table = Table(title=f"Overload at {args.factor:g}x capacity ({capacity:.0f} req/s)")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in result.items():
        table.add_row(key, f"{value:.1f}" if isinstance(value, float) else str(value))
    Console().print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
