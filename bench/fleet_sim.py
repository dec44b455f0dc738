"""A larger fleet, simulated: N gateways x M engine replicas of configurable speed.

Each engine is ``bench.mock_engine`` with a bounded batch (``--capacity`` answers at a
time, each taking ``--delay-ms``), so one replica serves at most capacity/delay requests
per second, like a real engine at its batch limit. Every gateway (a real ``weir serve``)
lists every replica and shares one ``redis-server`` for keys and limits. For each
(N, M) it measures:

- throughput: ``wrk`` closed-loop connections spread over the gateways for ``--seconds``;
- exactness: a key with ``rpm = --rpm`` gets a burst of 3x that many concurrent
  requests over all gateways; exactly ``rpm`` must be admitted.

Writes ``bench-results/fleet_sim.json`` and ``fleet_sim.png`` (the scaling curve).
Black-box: it runs ``weir`` and ``redis-server`` and speaks HTTP.

    python -m bench.fleet_sim [--gateways 1 2] [--replicas 1 2 4 8] [--seconds 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from bench.config_builder import model, weir_toml
from bench.overhead import WRK_SCRIPT, wrk
from bench.procs import free_port, start, start_gateway, stop_all, wait_for

ADMIN = "fleet-sim-admin"


def gateway_toml(port: int, redis: str, engines: list[str]) -> str:
    """One gateway of the tier: keys in the shared Redis, no cache, no retrieval."""
    return weir_toml(
        gateway={"port": port},
        keys={"enabled": True, "redis_url": redis, "admin_key": ADMIN},
        cache={"enabled": False},
        retrieval={"enabled": False},
        observability={"access_log": False},
        models=[
            model(
                "smollm2", "mock", urls=engines, routing={"max_in_flight": 512, "max_queue": 1024}
            )
        ],
    )


BODY = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}


def start_redis(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    binary = shutil.which("redis-server") or "redis-server"
    proc = start([binary, "--port", str(port), "--save", "", "--appendonly", "no"], work / "r.log")
    time.sleep(0.5)
    return proc, f"redis://127.0.0.1:{port}/0"


def make_key(gateway: str, **limits: int) -> str:
    answer = httpx.post(f"{gateway}/weir/admin/keys", json={"name": "sim", **limits},
                        headers={"authorization": f"Bearer {ADMIN}"}, timeout=10)  # fmt: skip
    answer.raise_for_status()
    key: str = answer.json()["key"]
    return key


def throughput(
    gateways: list[str], key: str, clients: int, seconds: int, work: Path
) -> dict[str, Any]:
    """wrk against every gateway at once (a C load generator: Python clients on the same
    2 cores would measure themselves), clients split over the gateways."""
    script = work / "post.lua"
    script.write_text(WRK_SCRIPT.format(body=json.dumps(BODY), key=key))
    with ThreadPoolExecutor(len(gateways)) as pool:
        runs = list(pool.map(
            lambda g: wrk(f"{g}/v1/chat/completions", clients // len(gateways), seconds, script),
            gateways,
        ))  # fmt: skip
    rps = sum(r["rps"] for r in runs)
    non2xx = sum(r["non2xx"] for r in runs)
    return {
        "rps": rps,
        "ok_rps": rps - non2xx / seconds,  # answers that were 200s
        "p50_ms": max(r["p50"] for r in runs),
        "p99_ms": max(r["p99"] for r in runs),
        "non2xx": non2xx,
    }


async def burst(gateways: list[str], key: str, count: int) -> dict[str, int]:
    headers = {"authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(timeout=60, limits=limits, headers=headers) as client:
        answers = await asyncio.gather(
            *(
                client.post(f"{gateways[i % len(gateways)]}/v1/chat/completions", json=BODY)
                for i in range(count)
            )
        )
    return dict(Counter(_outcome(a) for a in answers))


def _outcome(answer: httpx.Response) -> str:
    if answer.status_code in (200, 429):
        return str(answer.status_code)
    try:
        return f"{answer.status_code} {answer.json()['error']['code']}"
    except (ValueError, KeyError, TypeError):
        return str(answer.status_code)


def wait_for_fresh_window(margin_s: float = 15.0) -> None:
    """Limits count per wall-clock minute: a burst must not straddle two windows."""
    into = time.time() % 60
    if into > 60 - margin_s:
        time.sleep(60 - into + 0.5)


def run_cell(args: argparse.Namespace, n: int, m: int, work: Path, redis: str) -> dict[str, Any]:
    engines = [free_port() for _ in range(m)]
    mock = [sys.executable, "-m", "bench.mock_engine", "--delay-ms", str(args.delay_ms),
            "--capacity", str(args.capacity)]  # fmt: skip
    procs = [start([*mock, "--port", str(p)], work / f"mock-{p}.log") for p in engines]
    urls = [f"http://127.0.0.1:{p}" for p in engines]
    ports = [free_port() for _ in range(n)]
    procs += [start_gateway(gateway_toml(p, redis, urls), work, f"gw{p}") for p in ports]
    try:
        for p in engines:
            wait_for(f"http://127.0.0.1:{p}/health")
        gateways = [f"http://127.0.0.1:{p}" for p in ports]
        for gateway in gateways:
            wait_for(f"{gateway}/readyz")
        key = make_key(gateways[0])
        result = throughput(gateways, key, args.clients, args.seconds, work)
        limited = make_key(gateways[0], rpm=args.rpm)
        time.sleep(2)  # an overloaded gateway skips Redis for limits.retry_s: let it recover
        wait_for_fresh_window()
        result["burst"] = asyncio.run(burst(gateways, limited, 3 * args.rpm))
        result["exact"] = result["burst"].get("200", 0) == args.rpm
        result["capacity_rps"] = m * args.capacity / (args.delay_ms / 1000)
        return result
    finally:
        stop_all(procs)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gateways", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--delay-ms", type=float, default=100.0, help="each answer's time")
    parser.add_argument("--capacity", type=int, default=4, help="answers at a time per replica")
    parser.add_argument("--clients", type=int, default=96, help="closed-loop clients")
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rpm", type=int, default=60, help="the limit checked for exactness")
    parser.add_argument("--out", default="bench-results/fleet_sim.json")
    args = parser.parse_args()
    console = Console(width=120)
    work = Path(tempfile.mkdtemp(prefix="weir-fleet-"))
    redis_proc, redis = start_redis(work)
    cells: list[dict[str, Any]] = []
    try:
        with Progress(console=console) as progress:
            task = progress.add_task("fleet cells", total=len(args.gateways) * len(args.replicas))
            for n in args.gateways:
                for m in args.replicas:
                    cell = {"gateways": n, "replicas": m, **run_cell(args, n, m, work, redis)}
                    cells.append(cell)
                    progress.advance(task)
    finally:
        stop_all([redis_proc])
    table = Table(title=f"Simulated fleet: replicas of {args.capacity} x {args.delay_ms:g} ms,"
                        f" {args.clients} clients, {args.seconds:g} s per cell")  # fmt: skip
    for column in ("gateways", "replicas", "ceiling req/s", "answers/s", "200s/s", "p50 ms",
                   "p99 ms", "non-2xx", f"burst of {3 * args.rpm}, rpm={args.rpm}",
                   "exact"):  # fmt: skip
        table.add_column(column, justify="right")
    for c in cells:
        table.add_row(
            str(c["gateways"]), str(c["replicas"]), f"{c['capacity_rps']:.0f}", f"{c['rps']:.0f}",
            f"{c['ok_rps']:.0f}",
            f"{c['p50_ms']:.1f}", f"{c['p99_ms']:.1f}", f"{c['non2xx']:.0f}", str(c["burst"]),
            "yes" if c["exact"] else "NO",
        )  # fmt: skip
    console.print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "cells": cells}, indent=2))
    plot(cells, out.with_suffix(".png"))
    console.print(f"written to {out} and {out.with_suffix('.png')}")


def plot(cells: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for n in sorted({c["gateways"] for c in cells}):
        row = [c for c in cells if c["gateways"] == n]
        axis.plot([c["replicas"] for c in row], [c["ok_rps"] for c in row], "o-",
                  label=f"{n} gateway{'s' if n > 1 else ''}")  # fmt: skip
    ceiling = sorted({(c["replicas"], c["capacity_rps"]) for c in cells})
    axis.plot([r for r, _ in ceiling], [v for _, v in ceiling], "k--", label="engine ceiling")
    axis.set_xlabel("engine replicas")
    axis.set_ylabel("200 answers/s through the gateways")
    axis.set_xscale("log", base=2)
    axis.set_title("Throughput vs replicas (simulated engines)")
    axis.grid(True, alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
