"""What the cache saves: hit vs miss latency on one prompt, and a half-cached embedding batch.

Against a running gateway with real engines (``make serve``, or any ``--gateway``), in one
run and interleaved: the same temperature-0 chat request sent with
``x-weir-cache-control: refresh`` (always a miss: the engine answers and the entry is
rewritten) and plainly (a hit). Then embeddings: batches of 64 new texts (all misses)
against batches of 64 where 32 were embedded just before (half hits).

Black-box: HTTP only.

    python -m bench.cache_latency --gateway http://127.0.0.1:8000 [--rounds 100] [--key KEY]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import track
from rich.table import Table

BODY = {
    "model": "smollm2",
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    "temperature": 0,
    "max_tokens": 16,
}


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def timed(client: httpx.Client, path: str, body: object, headers: dict[str, str]) -> float:
    started = time.perf_counter()
    answer = client.post(path, json=body, headers=headers)
    elapsed = (time.perf_counter() - started) * 1000
    answer.raise_for_status()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gateway", default="http://127.0.0.1:8000")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--embed-rounds", type=int, default=20)
    parser.add_argument("--key", default=None, help="API key, if the gateway wants one")
    parser.add_argument("--out", default="bench-results/cache_latency.json")
    args = parser.parse_args()
    auth = {"authorization": f"Bearer {args.key}"} if args.key else {}
    refresh = auth | {"x-weir-cache-control": "refresh"}
    chat = "/v1/chat/completions"
    results: dict[str, list[float]] = {"miss": [], "hit": [], "embed all new": [],
                                       "embed half cached": []}  # fmt: skip
    with httpx.Client(base_url=args.gateway, timeout=120) as client:
        timed(client, chat, BODY, refresh)
        for _ in track(range(args.rounds), description="chat: miss, hit"):
            results["miss"].append(timed(client, chat, BODY, refresh))
            results["hit"].append(timed(client, chat, BODY, auth))
        for _ in track(range(args.embed_rounds), description="embeddings, 64 a batch"):
            fresh = [f"text {uuid.uuid4().hex} number {n}" for n in range(64)]
            results["embed all new"].append(
                timed(client, "/v1/embeddings", {"model": "minilm", "input": fresh}, auth)
            )
            half = [f"text {uuid.uuid4().hex} number {n}" for n in range(64)]
            timed(client, "/v1/embeddings", {"model": "minilm", "input": half[:32]}, auth)
            time.sleep(0.05)  # the cache write happens after the answer
            results["embed half cached"].append(
                timed(client, "/v1/embeddings", {"model": "minilm", "input": half}, auth)
            )
    stats = {k: {"p50": pct(v, 50), "p99": pct(v, 99)} for k, v in results.items()}
    table = Table(title="Cache: client latency (ms)")
    for column in ("case", "p50", "p99"):
        table.add_column(column, justify="right")
    for case, value in stats.items():
        table.add_row(case, f"{value['p50']:.2f}", f"{value['p99']:.2f}")
    Console().print(table)
    speedup = stats["embed all new"]["p50"] / stats["embed half cached"]["p50"]
    print(f"chat hit is {stats['miss']['p50'] / stats['hit']['p50']:.0f}x faster at p50;"
          f" half-cached embedding batch {speedup:.2f}x faster at p50")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"stats": stats, "samples_ms": results}))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
