"""Fair queueing and the Batch API against a shared engine (issue 23's Show list).

The engine is ``bench.mock_engine --slots C`` (C requests at once, the rest in its own
first-come-first-served line, like vLLM's waiting queue); the gateway is ``weir serve``
with ``max_in_flight = C``. Tenants are two static keys.

``noisy``: tenant B sends a steady Poisson stream of streamed chats; tenant A floods the
same model at ``--flood`` times B's rate. B's time to first token (first content chunk)
alone and with A flooding, through a fair gateway and an FCFS one (``fair_queueing =
false``), in one run.

``gaps``: the same steady interactive stream alone, then beside a ``--batch``-request
batch (``/v1/batches``), then the batch alone: interactive p50/p99 TTFT with and without
the batch, and the batch's throughput while interactive load idles against the engine's
own (C / answer time).

Black-box: ``weir`` as a command, HTTP only.

    python -m bench.fair_queue noisy [--slots 8] [--rate 4] [--flood 10] [--seconds 20]
    python -m bench.fair_queue gaps [--batch 2000] [--seconds 20]
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

from bench.config_builder import model, weir_toml
from bench.procs import free_port, start, start_gateway, stop_all, wait_for

KEYS = {"a": "sk-tenant-a", "b": "sk-tenant-b"}
CHAT = "/v1/chat/completions"


def config(port: int, mock: int, logs: Path, work: Path, slots: int, fair: bool) -> str:
    routing = {"max_in_flight": slots, "max_queue": 4096, "queue_timeout_s": 60.0,
               "fair_queueing": fair}  # fmt: skip
    return weir_toml(
        gateway={"port": port, "api_keys": list(KEYS.values())},
        engines={"log_dir": logs},
        cache={"enabled": False},
        batches={"sqlite_path": str(work / f"batches-{port}.sqlite3"),
                 "concurrency": 4 * slots, "poll_s": 0.2},
        models=[model("smollm2", "mock", url=f"http://127.0.0.1:{mock}", routing=routing,
                      timeouts={"ttft_s": 120.0})],
    )  # fmt: skip


def pct(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


@dataclass
class Stream:
    ttft: list[float] = field(default_factory=list)
    refused: int = 0
    failed: int = 0


async def streamed(client: aiohttp.ClientSession, base: str, key: str, out: Stream) -> None:
    body = {"model": "smollm2", "stream": True,
            "messages": [{"role": "user", "content": "Hi"}]}  # fmt: skip
    started = time.perf_counter()
    headers = {"authorization": f"Bearer {key}"}
    try:
        async with client.post(base + CHAT, json=body, headers=headers) as answer:
            if answer.status == 503:
                out.refused += 1
                await answer.read()
                return
            if answer.status != 200:
                out.failed += 1
                await answer.read()
                return
            first = None
            async for line in answer.content:
                if first is None and b"tok0" in line:
                    first = time.perf_counter() - started
            if first is not None:
                out.ttft.append(first)
    except (aiohttp.ClientError, TimeoutError):
        out.failed += 1


async def poisson(base: str, key: str, rate: float, seconds: float, seed: int, out: Stream) -> None:
    rng = random.Random(seed)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as client:
        tasks = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            tasks.append(asyncio.create_task(streamed(client, base, key, out)))
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)


def row(name: str, s: Stream) -> dict[str, Any]:
    return {"phase": name, "n": len(s.ttft), "p50_ms": round(pct(s.ttft, 50) * 1000, 1),
            "p99_ms": round(pct(s.ttft, 99) * 1000, 1), "refused": s.refused,
            "failed": s.failed}  # fmt: skip


class Rig:
    def __init__(self, work: Path, args: argparse.Namespace, *, fair: bool, name: str) -> None:
        self.mock = free_port()
        mock_args = ["--port", str(self.mock), "--slots", str(args.slots), "--chunks",
                     str(args.chunks), "--interval-ms", str(args.interval_ms),
                     "--delay-ms", str(args.chunks * args.interval_ms)]  # fmt: skip
        self.procs = [start([sys.executable, "-m", "bench.mock_engine", *mock_args],
                            work / f"mock-{name}.log")]  # fmt: skip
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        text = config(port, self.mock, work, work, args.slots, fair)
        self.procs.append(start_gateway(text, work, f"gateway-{name}"))
        wait_for(f"http://127.0.0.1:{self.mock}/health")
        wait_for(f"{self.base}/readyz", 60)

    def stop(self) -> None:
        stop_all(self.procs)


async def noisy(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    rows = []
    for fair in (True, False):
        label = "fair" if fair else "fcfs"
        rig = Rig(work, args, fair=fair, name=label)
        try:
            alone = Stream()
            await poisson(rig.base, KEYS["b"], args.rate, args.seconds, 1, alone)
            with_flood, flood = Stream(), Stream()
            await asyncio.gather(
                poisson(rig.base, KEYS["b"], args.rate, args.seconds, 2, with_flood),
                poisson(rig.base, KEYS["a"], args.rate * args.flood, args.seconds, 3, flood),
            )
        finally:
            rig.stop()
        rows += [row(f"{label}: B alone", alone), row(f"{label}: B with A flooding", with_flood),
                 row(f"{label}: A (flooding)", flood)]  # fmt: skip
        rows.append({"phase": f"{label}: B p50 ratio", "ratio": round(
            pct(with_flood.ttft, 50) / pct(alone.ttft, 50), 3), "p99 ratio": round(
            pct(with_flood.ttft, 99) / pct(alone.ttft, 99), 3)})  # fmt: skip
    return rows


async def run_batch(base: str, n: int, key: str) -> tuple[str, float, float]:
    """Upload and start an ``n``-request batch; (id, submitted at, perf_counter)."""
    lines = [json.dumps({"custom_id": f"r{i}", "method": "POST", "url": CHAT, "body": {
        "model": "smollm2", "messages": [{"role": "user", "content": f"item {i}"}]}})
        for i in range(n)]  # fmt: skip
    headers = {"authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession() as client:
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", ("\n".join(lines) + "\n").encode(), filename="in.jsonl")
        async with client.post(base + "/v1/files", data=form, headers=headers) as answer:
            uploaded = await answer.json()
        spec = {"input_file_id": uploaded["id"], "endpoint": CHAT, "completion_window": "24h"}
        started = time.perf_counter()
        async with client.post(base + "/v1/batches", json=spec, headers=headers) as answer:
            batch = await answer.json()
    return batch["id"], time.time(), started


async def batch_state(base: str, batch_id: str, key: str) -> dict[str, Any]:
    headers = {"authorization": f"Bearer {key}"}
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"{base}/v1/batches/{batch_id}", headers=headers) as answer,
    ):
        found: dict[str, Any] = await answer.json()
        return found


async def gaps(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    rig = Rig(work, args, fair=True, name="gaps")
    rows: list[dict[str, Any]] = []
    try:
        alone = Stream()
        await poisson(rig.base, KEYS["b"], args.rate, args.seconds, 1, alone)
        batch_id, _, started = await run_batch(rig.base, args.batch, KEYS["a"])
        beside = Stream()
        await poisson(rig.base, KEYS["b"], args.rate, args.seconds, 2, beside)
        during = (await batch_state(rig.base, batch_id, KEYS["a"]))["request_counts"]
        # interactive load idles: the batch alone, measured over its own progress
        mark = time.perf_counter()
        first = (await batch_state(rig.base, batch_id, KEYS["a"]))["request_counts"]
        while True:
            state = await batch_state(rig.base, batch_id, KEYS["a"])
            if state["status"] in ("completed", "failed", "cancelled", "expired"):
                break
            await asyncio.sleep(0.2)
        took = time.perf_counter() - mark
        done = state["request_counts"]
        idle_rate = done["completed"] + done["failed"] - first["completed"] - first["failed"]
        engine_rate = args.slots / (args.chunks * args.interval_ms / 1000)
        rows += [row("interactive alone", alone), row("interactive beside the batch", beside)]
        rows.append({"phase": "interactive TTFT ratio (with/without batch)",
                     "p50": round(pct(beside.ttft, 50) / pct(alone.ttft, 50), 3),
                     "p99": round(pct(beside.ttft, 99) / pct(alone.ttft, 99), 3)})  # fmt: skip
        rows.append({"phase": "batch during interactive load", "requests": during["completed"],
                     "per_s": round(during["completed"] / args.seconds, 1)})  # fmt: skip
        rows.append({"phase": "batch while interactive idles", "requests": idle_rate,
                     "per_s": round(idle_rate / took, 1), "engine_per_s": round(engine_rate, 1),
                     "share_of_engine": round(idle_rate / took / engine_rate, 3),
                     "status": state["status"], "counts": done,
                     "total_s": round(time.perf_counter() - started, 1)})  # fmt: skip
    finally:
        rig.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=("noisy", "gaps"))
    parser.add_argument("--slots", type=int, default=8, help="the engine's batch")
    parser.add_argument("--chunks", type=int, default=32)
    parser.add_argument("--interval-ms", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=4.0, help="B's requests per second")
    parser.add_argument("--flood", type=float, default=10.0, help="A's rate over B's")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--batch", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="weir-fair-") as tmp:
        work = Path(tmp)
        rows = asyncio.run(noisy(args, work) if args.what == "noisy" else gaps(args, work))
    print(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
