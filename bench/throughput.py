"""Output tokens/s through the gateway next to the same load sent straight to the engine.

A black-box HTTP client: it imports nothing of Weir's. Rounds alternate between the two
targets so that drift on a noisy machine hits both alike. Tokens are counted from the
server's ``usage``, never from chunks.

    python -m bench.throughput --gateway http://127.0.0.1:8000 --concurrency 1 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp
from rich.console import Console
from rich.progress import Progress
from rich.table import Table


@dataclass
class Round:
    target: str
    concurrency: int
    requests: int
    output_tokens: int
    seconds: float
    errors: int

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds else 0.0


async def one_stream(
    session: aiohttp.ClientSession, base: str, model: str, max_tokens: int, prompt: str
) -> int:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "ignore_eos": True,  # vLLM extension: every request generates max_tokens
        "temperature": 0.7,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    tokens = 0
    async with session.post(f"{base}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.content:
            if line.startswith(b"data: {") and b'"usage"' in line:
                usage = json.loads(line[6:]).get("usage") or {}
                tokens = int(usage.get("completion_tokens", 0))
    return tokens


async def run_round(
    target: str, base: str, model: str, concurrency: int, requests: int, max_tokens: int
) -> Round:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(requests):
        queue.put_nowait(n)
    totals = {"tokens": 0, "errors": 0}
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def worker() -> None:
            while True:
                try:
                    n = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                try:
                    prompt = f"Tell me a long story about a lighthouse keeper, part {n}."
                    # await first: `totals[...] += await ...` reads the total before the
                    # await and loses the other workers' additions made meanwhile
                    tokens = await one_stream(session, base, model, max_tokens, prompt)
                    totals["tokens"] += tokens
                except (TimeoutError, aiohttp.ClientError):
                    totals["errors"] += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return Round(target, concurrency, requests, totals["tokens"], elapsed, totals["errors"])


async def engine_url(gateway: str, model: str) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{gateway}/weir/engines") as response,
    ):
        engines = (await response.json())["data"]
    for engine in engines:
        if engine["model"] == model and engine["healthy"] and engine["base_url"]:
            return str(engine["base_url"])
    raise SystemExit(f"no healthy engine for {model} listed at {gateway}/weir/engines")


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    direct = args.engine or await engine_url(args.gateway, args.model)
    targets = {"direct": direct, "gateway": args.gateway}
    console = Console()
    console.print(f"direct engine: {direct}   gateway: {args.gateway}   model: {args.model}")
    rounds: list[Round] = []
    plan = [(c, r, t) for c in args.concurrency for r in range(args.rounds) for t in targets]
    with Progress(console=console) as progress:
        task = progress.add_task("rounds", total=len(plan))
        for c, r, _ in plan[:: len(targets)]:
            order = list(targets) if r % 2 == 0 else list(reversed(targets))
            for target in order:
                requests = max(args.requests, c * args.waves)
                rounds.append(
                    await run_round(
                        target, targets[target], args.model, c, requests, args.max_tokens
                    )
                )
                progress.advance(task)
    table = Table(title=f"Output tokens/s, {args.max_tokens} tokens per request (median of rounds)")
    for column in ("concurrency", "direct tok/s", "gateway tok/s", "gateway / direct", "errors"):
        table.add_column(column, justify="right")
    summary = []
    for c in args.concurrency:
        med = {
            t: statistics.median(
                x.tokens_per_s for x in rounds if x.target == t and x.concurrency == c
            )
            for t in targets
        }
        errors = sum(x.errors for x in rounds if x.concurrency == c)
        ratio = med["gateway"] / med["direct"] if med["direct"] else 0.0
        summary.append(
            {"concurrency": c, **{f"{t}_tok_s": v for t, v in med.items()}, "ratio": ratio}
        )
        table.add_row(
            str(c), f"{med['direct']:.1f}", f"{med['gateway']:.1f}", f"{ratio:.3f}", str(errors)
        )
    console.print(table)
    return {"summary": summary, "rounds": [asdict(r) for r in rounds]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gateway", default="http://127.0.0.1:8000")
    parser.add_argument(
        "--engine", default=None, help="engine base URL (default: from /weir/engines)"
    )
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--requests", type=int, default=6, help="at least this many per round")
    parser.add_argument(
        "--waves", type=int, default=3, help="at least concurrency x waves requests"
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="rounds per target and concurrency")
    parser.add_argument("--out", default="bench-results/throughput.json")
    args = parser.parse_args()
    results = asyncio.run(main_async(args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"raw rounds written to {out}")


if __name__ == "__main__":
    main()
