"""What the rate limiter adds per request: Redis on loopback, in-process, and off.

Starts ``redis-server`` (Debian's package), a mock engine and three gateways with
``weir serve``, all with API keys in that Redis (so auth costs the same everywhere):
limits off, limits in-process, limits in Redis. One key with every per-key limit set
(rpm, tpm, tokens per day, concurrency; high enough never to refuse) is made through the
admin API. The same chat request goes to each gateway in turn, one at a time; the
differences between gateways are what the limiter costs (admission is on the request
path, settlement after the answer).

Black-box: it runs ``weir`` and ``redis-server`` and speaks HTTP; it imports nothing of Weir's.

    python -m bench.limiter_overhead --requests 2000
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import track
from rich.table import Table

from bench.config_builder import model, weir_toml
from bench.procs import free_port, start, start_gateway, stop_all, wait_for

ADMIN = "bench-admin-key"


def config(port: int, mock: int, logs: Path, redis: str, *, enabled: bool, store: str) -> str:
    return weir_toml(
        gateway={"port": port},
        keys={"enabled": True, "redis_url": redis, "admin_key": ADMIN},
        limits={"enabled": enabled, "store": store},
        engines={"log_dir": logs},
        models=[
            model(
                "smollm2",
                "mock",
                url=f"http://127.0.0.1:{mock}",
                engine_args=["--max-model-len", "2048"],
                tokenizer="smollm2-135m-instruct",
            )
        ],
    )


BODY = {
    "model": "smollm2",
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "max_tokens": 16,
}


def percentile(samples: list[float], q: int) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[q - 1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000, help="per gateway")
    parser.add_argument("--out", default="bench-results/limiter_overhead.json")
    args = parser.parse_args()
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    work = Path(tempfile.mkdtemp(prefix="weir-bench-"))
    redis_port, mock_port = free_port(), free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    redis_cmd = [
        binary, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no", "--dir", str(work), "--maxmemory-policy", "noeviction",
    ]  # fmt: skip
    procs: list[subprocess.Popen[bytes]] = [
        start(redis_cmd, work / "redis.log"),
        start([sys.executable, "-m", "bench.mock_engine", "--port", str(mock_port)],
              work / "mock.log"),
    ]  # fmt: skip
    targets: dict[str, str] = {}
    for name, enabled, store in (
        ("limits off", False, "auto"),
        ("limits in-process", True, "memory"),
        ("limits in Redis", True, "redis"),
    ):
        port = free_port()
        text = config(port, mock_port, work / "engines", redis_url, enabled=enabled, store=store)
        procs.append(start_gateway(text, work, name.replace(" ", "-")))
        targets[name] = f"http://127.0.0.1:{port}"
    samples: dict[str, list[float]] = {t: [] for t in targets}
    limited: str | None = None
    try:
        wait_for(f"http://127.0.0.1:{mock_port}/health")
        for base in targets.values():
            wait_for(f"{base}/readyz")
        with httpx.Client(timeout=10) as client:
            made = client.post(
                f"{targets['limits in Redis']}/weir/admin/keys",
                headers={"authorization": f"Bearer {ADMIN}"},
                json={"name": "bench", "rpm": 10**9, "tpm": 10**12,
                      "tokens_per_day": 10**13, "max_concurrency": 1000},
            )  # fmt: skip
            made.raise_for_status()
            headers = {"authorization": f"Bearer {made.json()['key']}"}
            for _ in range(100):  # warm up every path
                for base in targets.values():
                    client.post(
                        f"{base}/v1/chat/completions", json=BODY, headers=headers
                    ).raise_for_status()
            for n in track(range(args.requests), description="interleaved requests"):
                order = list(targets) if n % 2 == 0 else list(reversed(targets))
                for target in order:
                    started = time.perf_counter_ns()
                    answer = client.post(
                        f"{targets[target]}/v1/chat/completions", json=BODY, headers=headers
                    )
                    samples[target].append((time.perf_counter_ns() - started) / 1e6)
                    answer.raise_for_status()
                    if target == "limits in Redis":
                        limited = answer.headers.get("x-ratelimit-remaining-tokens")
    finally:
        stop_all(procs)
    stats = {t: {"p50": percentile(s, 50), "p99": percentile(s, 99)} for t, s in samples.items()}
    off = stats["limits off"]
    table = Table(title=f"Chat through the gateway, concurrency 1, {args.requests} each (ms)")
    for column in ("path", "p50", "p99", "p50 added", "p99 added"):
        table.add_column(column, justify="right")
    for target, value in stats.items():
        table.add_row(
            target,
            f"{value['p50']:.3f}",
            f"{value['p99']:.3f}",
            f"{value['p50'] - off['p50']:+.3f}",
            f"{value['p99'] - off['p99']:+.3f}",
        )
    Console().print(table)
    print(f"last answer's x-ratelimit-remaining-tokens: {limited}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"stats": stats, "samples_ms": samples}))
    print(f"raw samples in {out}")


if __name__ == "__main__":
    main()
