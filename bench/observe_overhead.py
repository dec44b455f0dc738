"""What observability costs per request: metrics, the access log and tracing, on and off.

Starts a mock engine, a stand-in OTLP/HTTP collector (it accepts ``POST /v1/traces`` and
counts what arrives) and three gateways with ``weir serve`` in front of the mock:

- ``off``: no metrics, no access log, no tracing;
- ``metrics + log``: ``/metrics`` counted, one JSON access line per request (to a file);
- ``metrics + log + traces``: the same, plus OTLP export to the collector
  (``OTEL_EXPORTER_OTLP_ENDPOINT``, batch span processor).

The same chat request (and a streamed one) goes to each in turn, one at a time; the
differences from ``off`` are the cost. Black-box: ``weir`` as a command, and HTTP.

    python -m bench.observe_overhead --requests 2000
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from aiohttp import web
from rich.console import Console
from rich.progress import track
from rich.table import Table

from bench.config_builder import model, weir_toml
from bench.procs import free_port, start, start_gateway, stop_all, wait_for


def config(port: int, mock: int, logs: Path, *, metrics: bool, access_log: bool) -> str:
    return weir_toml(
        gateway={"port": port},
        observability={"metrics": metrics, "access_log": access_log, "log_format": "json"},
        engines={"log_dir": logs},
        models=[model("smollm2", "mock", url=f"http://127.0.0.1:{mock}")],
    )


BODY = {
    "model": "smollm2",
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "max_tokens": 16,
}


class Collector:
    """An OTLP/HTTP endpoint that accepts spans and counts the bytes (in its own thread)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.posts = 0
        self.bytes = 0
        ready = threading.Event()

        async def traces(request: web.Request) -> web.Response:
            self.posts += 1
            self.bytes += len(await request.read())
            return web.Response(content_type="application/x-protobuf")

        def run() -> None:
            app = web.Application()
            app.router.add_post("/v1/traces", traces)
            web.run_app(app, host="127.0.0.1", port=self.port, print=lambda *_: ready.set(),
                        handle_signals=False)  # fmt: skip

        threading.Thread(target=run, daemon=True).start()
        ready.wait(10)


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000, help="per gateway and kind")
    parser.add_argument("--out", default="bench-results/observe_overhead.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="weir-bench-"))
    collector = Collector()
    mock = free_port()
    procs = [
        start([sys.executable, "-m", "bench.mock_engine", "--port", str(mock), "--chunks", "16"],
              work / "mock.log")
    ]  # fmt: skip
    otel = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.port}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_BSP_SCHEDULE_DELAY": "500",
    }
    targets: dict[str, str] = {}
    for name, metrics, log, env in (
        ("off", False, False, {"OTEL_TRACES_EXPORTER": "none"}),
        ("metrics + log", True, True, {"OTEL_TRACES_EXPORTER": "none"}),
        ("metrics + log + traces", True, True, otel),
    ):
        port = free_port()
        text = config(port, mock, work, metrics=metrics, access_log=log)
        slug = name.replace(" + ", "-")
        procs.append(start_gateway(text, work, slug, env=env, log_level="INFO"))
        targets[name] = f"http://127.0.0.1:{port}"
    samples: dict[str, dict[str, list[float]]] = {t: {"chat": [], "stream": []} for t in targets}
    try:
        wait_for(f"http://127.0.0.1:{mock}/health")
        for base in targets.values():
            wait_for(f"{base}/readyz")
        with httpx.Client(timeout=10) as client:
            for _ in range(100):
                for base in targets.values():
                    client.post(f"{base}/v1/chat/completions", json=BODY).raise_for_status()
            for n in track(range(args.requests), description="interleaved requests"):
                order = list(targets) if n % 2 == 0 else list(reversed(targets))
                for target in order:
                    url = f"{targets[target]}/v1/chat/completions"
                    started = time.perf_counter_ns()
                    client.post(url, json=BODY).raise_for_status()
                    samples[target]["chat"].append((time.perf_counter_ns() - started) / 1e6)
                    started = time.perf_counter_ns()
                    with client.stream("POST", url, json=BODY | {"stream": True}) as answer:
                        for _ in answer.iter_bytes():
                            pass
                    samples[target]["stream"].append((time.perf_counter_ns() - started) / 1e6)
        time.sleep(1.5)  # the batch exporter's last flush
    finally:
        stop_all(procs)
    stats = {
        t: {k: {"p50": pct(v, 50), "p99": pct(v, 99)} for k, v in kinds.items()}
        for t, kinds in samples.items()
    }
    table = Table(title=f"Instrumentation cost, concurrency 1, {args.requests} requests each (ms)")
    for column in ("gateway", "kind", "p50", "p99", "p50 added", "p99 added"):
        table.add_column(column, justify="right")
    for target, kinds in stats.items():
        for kind, value in kinds.items():
            off = stats["off"][kind]
            table.add_row(
                target, kind, f"{value['p50']:.3f}", f"{value['p99']:.3f}",
                f"{value['p50'] - off['p50']:+.3f}", f"{value['p99'] - off['p99']:+.3f}",
            )  # fmt: skip
    Console().print(table)
    print(f"collector received {collector.posts} OTLP posts, {collector.bytes / 1e6:.1f} MB")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"stats": stats, "otlp_posts": collector.posts}))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
