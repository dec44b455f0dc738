"""Requests/s through ``weir serve --workers N`` in front of one mock engine (issue 26).

    python -m bench.workers_rate --workers 1 2 [--seconds 6] [--connections 4 16 32 64]

For each N: N gateway workers on one port in front of one mock engine
(``bench.mock_engine``), then ``wrk`` (Debian's package, closed loop, as ``bench.overhead``
runs it) at each connection count, the mock alone at the same counts first. Per N: the
requests/s and p99 at each count, and the highest rate whose p99 is within 10 ms of the
mock's own p99 at that count (the gateway's "p99 added under 10 ms"); then that rate over
one worker's. ``--engine nginx`` answers as the engine from nginx instead (the mock's
answer, fixed, a few µs of CPU each), leaving more of the machine to the workers; the
gateway cannot tell the two apart. The load generator and the engine share the machine's
cores with the workers: on a 2-core host two workers cannot have two whole cores, so the
ratio is a floor. So each run also reads the CPU time of the gateway's processes (all
workers and their parent): the cores they used, and requests/s per core used, which is
what scaling by workers keeps or loses whatever the host leaves them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table

from bench.config_builder import model, weir_toml
from bench.mock_engine import completion
from bench.overhead import NGINX_MAIN, WRK_SCRIPT, wrk
from bench.procs import free_port, start, stop_all, wait_for, weir_command

BODY = '{"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}'
ADDED_P99_MS = 10.0
NGINX_ENGINE = (
    NGINX_MAIN
    + """\
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        keepalive_requests 1000000;
        default_type application/json;
        location = /health {{ return 200 ''; }}
        location = /v1/models {{ return 200 '{models}'; }}
        location = /v1/chat/completions {{ return 200 '{answer}'; }}
    }}
}}
"""
)


def start_engine(kind: str, port: int, work: Path) -> subprocess.Popen[bytes]:
    """The engine the workers share: the mock (Python), or nginx returning its answer."""
    if kind == "mock":
        return start([sys.executable, "-m", "bench.mock_engine", "--port", str(port)],
                     work / "mock.log")  # fmt: skip
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    models = {"object": "list", "data": [{"id": "mock", "object": "model", "max_model_len": 8192}]}
    config = work / "nginx.conf"
    answer = json.dumps(completion("mock", 9, 2))
    config.write_text(NGINX_ENGINE.format(
        work=work, port=port, models=json.dumps(models), answer=answer,
    ))  # fmt: skip
    return start([nginx, "-c", str(config), "-e", str(work / "nginx-error.log")],
                 work / "nginx.log")  # fmt: skip


def gateway_rows(
    workers: int, mock: int, args: argparse.Namespace, script: Path, direct: dict[int, float]
) -> list[dict[str, float]]:
    work = Path(tempfile.mkdtemp(prefix="weir-workers-"))
    port = free_port()
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
    rows = []
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(f"{base}/readyz", 60)
        url = f"{base}/v1/chat/completions"
        wrk(url, 16, 2, script)  # warm-up
        for connections in args.connections:
            cpu_before = cpu_seconds(gateway)
            measured = wrk(url, connections, args.seconds, script)
            cores = (cpu_seconds(gateway) - cpu_before) / args.seconds
            added = measured["p99"] - direct[connections]
            per_core = measured["rps"] / max(cores, 1e-9)
            rows.append({"connections": connections, **measured, "added_p99": added,
                         "cores": cores, "per_core": per_core})  # fmt: skip
    finally:
        stop_all([gateway])
    return rows


def cpu_seconds(gateway: subprocess.Popen[bytes]) -> float:
    """User and system CPU seconds of the gateway and every process under it so far."""
    total = 0.0
    root = psutil.Process(gateway.pid)
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--connections", type=int, nargs="+", default=[4, 16, 32, 64])
    parser.add_argument("--engine", choices=["mock", "nginx"], default="mock",
                        help="what answers as the engine: bench.mock_engine or nginx")  # fmt: skip
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="weir-mock-"))
    script = work / "post.lua"
    script.write_text(WRK_SCRIPT.format(body=BODY, key="unused"))
    mock_port = free_port()
    mock = start_engine(args.engine, mock_port, work)
    console = Console(width=110)
    best: dict[int, dict[str, float]] = {}
    try:
        wait_for(f"http://127.0.0.1:{mock_port}/health", 30)
        mock_url = f"http://127.0.0.1:{mock_port}/v1/chat/completions"
        direct = {c: wrk(mock_url, c, args.seconds, script)["p99"] for c in args.connections}
        for n in args.workers:
            rows = gateway_rows(n, mock_port, args, script, direct)
            table = Table(title=f"weir serve --workers {n}")
            for column in ("connections", "req/s", "p50 ms", "p99 ms", "p99 added ms", "non-2xx",
                           "gateway cores", "req/s per core"):  # fmt: skip
                table.add_column(column, justify="right")
            for row in rows:
                table.add_row(
                    str(int(row["connections"])), f"{row['rps']:.0f}", f"{row['p50']:.2f}",
                    f"{row['p99']:.2f}", f"{row['added_p99']:+.2f}", str(int(row["non2xx"])),
                    f"{row['cores']:.2f}", f"{row['per_core']:.0f}",
                )  # fmt: skip
            console.print(table)
            held = [r for r in rows if r["added_p99"] < ADDED_P99_MS and not r["non2xx"]]
            best[n] = max(held, key=lambda r: r["rps"], default={"rps": 0.0, "cores": 0.0,
                                                                   "per_core": 0.0})  # fmt: skip
    finally:
        stop_all([mock])
    first = best.get(args.workers[0], {"rps": 0.0, "per_core": 0.0})
    for n, row in best.items():
        ratio = f"{row['rps'] / first['rps']:.2f}x" if first["rps"] else "-"
        per_core = f"{row['per_core'] / first['per_core']:.2f}x" if first["per_core"] else "-"
        console.print(f"workers={n}: {row['rps']:.0f} req/s with p99 added < {ADDED_P99_MS:g} ms"
                      f" ({ratio} of {args.workers[0]} worker), on {row['cores']:.2f} gateway"
                      f" cores: {row['per_core']:.0f} req/s per core ({per_core})")  # fmt: skip


if __name__ == "__main__":
    main()
