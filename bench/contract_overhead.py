"""What validation and token counting add per request, for a 1,000-token chat prompt.

Starts a mock engine (``bench.mock_engine``) and two gateways in front of it with
``weir serve``: one that counts prompt tokens with SmolLM2's tokenizer (``tokenizer``
set on the remote version), one that does not. Sends the same request straight to the
mock, through the counting gateway and through the other, interleaved, one at a time.

- through the non-counting gateway minus direct: proxying plus request validation;
- through the counting gateway minus the other: tokenizing and templating the prompt.

Black-box: it runs the ``weir`` command and speaks HTTP; it imports nothing of Weir's.

    python -m bench.contract_overhead --requests 2000
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import track
from rich.table import Table

from bench.procs import free_port, gateway_config, start, start_gateway, stop_all, wait_for


def percentile(samples: list[float], q: int) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[q - 1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000, help="per target")
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--out", default="bench-results/contract_overhead.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="weir-bench-"))
    mock_port, on_port, off_port = free_port(), free_port(), free_port()
    procs = [
        start(
            [sys.executable, "-m", "bench.mock_engine", "--port", str(mock_port)], work / "mock.log"
        )
    ]
    for port, tokenizer, name in (
        (on_port, "smollm2-135m-instruct", "on"),
        (off_port, None, "off"),
    ):
        config = gateway_config(port, mock_port, work, tokenizer=tokenizer)
        procs.append(start_gateway(config, work, f"gateway-{name}"))
    try:
        for port in (mock_port, on_port, off_port):
            wait_for(f"http://127.0.0.1:{port}/{'health' if port == mock_port else 'readyz'}")
        targets = {
            "direct": f"http://127.0.0.1:{mock_port}",
            "gateway, no counting": f"http://127.0.0.1:{off_port}",
            "gateway, counting": f"http://127.0.0.1:{on_port}",
        }
        # ~10 SmolLM2 tokens a sentence: 100 sentences make a ~1,000-token prompt.
        text = "The quick brown fox jumps over the lazy dog. " * (args.prompt_tokens // 10)
        body = {
            "model": "smollm2",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": text},
            ],
            "max_tokens": 16,
        }
        samples: dict[str, list[float]] = {t: [] for t in targets}
        prompt_tokens = 0
        with httpx.Client(timeout=10) as client:
            for _ in range(50):  # warm up every path
                for base in targets.values():
                    client.post(f"{base}/v1/chat/completions", json=body).raise_for_status()
            for n in track(range(args.requests), description="interleaved requests"):
                order = list(targets) if n % 2 == 0 else list(reversed(targets))
                for target in order:
                    started = time.perf_counter_ns()
                    response = client.post(f"{targets[target]}/v1/chat/completions", json=body)
                    samples[target].append((time.perf_counter_ns() - started) / 1e6)
                    response.raise_for_status()
            check = client.post(
                f"{targets['gateway, counting']}/v1/chat/completions",
                json=body | {"max_tokens": 2000},
            )
            # the gateway's own count, as its context_length_exceeded message states it
            found = re.search(r"\((\d+) in the prompt", check.json()["error"]["message"])
            prompt_tokens = int(found.group(1)) if found else 0
    finally:
        stop_all(procs)
    stats = {t: {"p50": percentile(s, 50), "p99": percentile(s, 99)} for t, s in samples.items()}
    direct, off, on = (stats[t] for t in targets)
    table = Table(
        title=f"Chat, {prompt_tokens}-token prompt, concurrency 1, {args.requests} each (ms)"
    )
    for column in ("path", "p50", "p99"):
        table.add_column(column, justify="right")
    for target, value in stats.items():
        table.add_row(target, f"{value['p50']:.3f}", f"{value['p99']:.3f}")
    table.add_row(
        "proxy + validation (no counting - direct)",
        f"{off['p50'] - direct['p50']:+.3f}",
        f"{off['p99'] - direct['p99']:+.3f}",
    )
    table.add_row(
        "token counting (counting - no counting)",
        f"{on['p50'] - off['p50']:+.3f}",
        f"{on['p99'] - off['p99']:+.3f}",
    )
    Console().print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"prompt_tokens": prompt_tokens, "stats": stats, "samples_ms": samples})
    )
    print(f"raw samples in {out}")


if __name__ == "__main__":
    main()
