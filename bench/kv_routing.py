"""KV-aware routing against least-outstanding and prefix-hash routing (issue 25).

Two real vLLM-CPU engines, each pinned to its own core, with a small KV cache
(``--num-gpu-blocks-override``) and KV events on; one ``weir serve`` in front of them with
three models over the same two engines, one per ``routing.strategy`` (``lo``, ``ph``,
``kv``). A multi-turn workload (tenants with their own 1,000+ token system prompt, after
``--preamble-words`` of instructions every tenant shares, if any; conversations that grow
turn by turn) is replayed on the same arrival schedule against
each, the engines' prefix caches emptied in between. Reported per strategy: client TTFT
p50/p90, the engines' own prefix-cache hit rate (``vllm:prefix_cache_hits`` /
``queries``), output tokens per second, and the imbalance of requests between the
engines ((max - min) / mean).

    .venv/bin/python -m bench.kv_routing [--conversations 32 --turns 4 --tenants 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.config_builder import model, weir_toml
from bench.procs import free_port, wait_for

WEIGHTS = "smollm2-135m-instruct"
STORE = Path("~/.cache/weir/models").expanduser()
STRATEGIES = {"lo": "least_outstanding", "ph": "prefix_hash", "kv": "kv_aware"}
WORDS = [
    "policy", "account", "refund", "invoice", "shipment", "order", "customer", "warranty",
    "support", "escalate", "priority", "ticket", "billing", "plan", "upgrade", "region",
    "latency", "outage", "credit", "review", "agent", "contract", "renewal", "discount",
    "partner", "audit", "compliance", "export", "import", "quota", "limit",
]  # fmt: skip


@dataclass
class Engine:
    port: int
    pub: int
    replay: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_engine(core: int, blocks: int, logs: Path) -> Engine:
    port, pub, replay = free_port(), free_port(), free_port()
    events = {"enable_kv_cache_events": True, "publisher": "zmq",
              "endpoint": f"tcp://*:{pub}", "replay_endpoint": f"tcp://*:{replay}"}  # fmt: skip
    cmd = ["taskset", "-c", str(core), sys.executable, "-m", "vllm.entrypoints.openai.api_server",
           "--model", str(STORE / WEIGHTS), "--served-model-name", "smollm2",
           "--host", "127.0.0.1", "--port", str(port), "--enforce-eager", "--dtype", "bfloat16",
           "--max-model-len", "4096", "--num-gpu-blocks-override", str(blocks),
           "--disable-uvicorn-access-log", "--kv-events-config", json.dumps(events)]  # fmt: skip
    env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": str(core),
                        "VLLM_SERVER_DEV_MODE": "1", "HF_HUB_OFFLINE": "1",
                        "VLLM_NO_USAGE_STATS": "1"}  # fmt: skip
    log = (logs / f"engine-{core}.log").open("wb")
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                               start_new_session=True)  # fmt: skip
    return Engine(port, pub, replay, process)


def start_gateway(engines: list[Engine], workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    urls = [e.url for e in engines]
    events = [f"tcp://127.0.0.1:{e.pub} tcp://127.0.0.1:{e.replay}" for e in engines]
    models = []
    for name, strategy in STRATEGIES.items():
        extra: dict[str, Any] = {"kv_events": events} if strategy == "kv_aware" else {}
        models.append(model(name, "v", urls=urls, tokenizer=WEIGHTS, served_name="smollm2",
                            engine_args=["--max-model-len", "4096"],
                            routing={"strategy": strategy}, **extra))  # fmt: skip
    config = workdir / "weir.toml"
    config.write_text(weir_toml(gateway={"port": port}, engines={"log_dir": workdir},
                                models=models))  # fmt: skip
    log = (workdir / "gateway.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "serving.cli", "--config", str(config), "serve"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    return process, f"http://127.0.0.1:{port}"


@dataclass
class Conversation:
    tenant: int
    start: float
    turns: list[str]
    messages: list[dict[str, str]] = field(default_factory=list)


def workload(args: argparse.Namespace) -> tuple[list[str], list[Conversation]]:
    rng = random.Random(args.seed)
    # what every tenant's system prompt starts with (a platform's own instructions), if any
    preamble = " ".join(rng.choice(WORDS) for _ in range(args.preamble_words))
    preamble = f"Platform rules: {preamble}. " if preamble else ""
    systems = []
    for tenant in range(args.tenants):  # differ from the first characters on (after it)
        words = " ".join(rng.choice(WORDS) for _ in range(args.system_words))
        systems.append(f"{preamble}Tenant {tenant} ({rng.random():.6f}) assistant rules: {words}.")
    conversations = []
    for n in range(args.conversations):
        turns = [" ".join(rng.choice(WORDS) for _ in range(args.user_words)) + "?"
                 for _ in range(args.turns)]  # fmt: skip
        start = rng.uniform(0, args.window_s)
        conversations.append(Conversation(n % args.tenants, start, turns))
    return systems, conversations


async def run_strategy(
    client: httpx.AsyncClient, base: str, name: str, systems: list[str],
    conversations: list[Conversation], args: argparse.Namespace,
) -> dict[str, Any]:  # fmt: skip
    ttfts: list[float] = []
    tokens = 0
    failures = 0
    began = time.monotonic()

    async def one(conv: Conversation) -> None:
        nonlocal tokens, failures
        messages = [{"role": "system", "content": systems[conv.tenant]}]
        for k, text in enumerate(conv.turns):
            due = began + conv.start + k * args.gap_s
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            messages.append({"role": "user", "content": text})
            body = {"model": name, "messages": messages, "max_tokens": args.max_tokens,
                    "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}  # fmt: skip
            sent = time.monotonic()
            first: float | None = None
            answer = []
            try:
                async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
                    r.raise_for_status()
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        for choice in chunk.get("choices") or []:
                            piece = (choice.get("delta") or {}).get("content")
                            if piece:
                                first = first or time.monotonic()
                                answer.append(piece)
                        if chunk.get("usage"):
                            tokens += chunk["usage"]["completion_tokens"]
            except httpx.HTTPError:
                failures += 1
                return
            if first is not None:
                ttfts.append(first - sent)
            messages.append({"role": "assistant", "content": "".join(answer)})

    await asyncio.gather(*(one(c) for c in conversations))
    elapsed = time.monotonic() - began
    ttfts.sort()
    return {
        "requests": len(ttfts), "failures": failures,
        "ttft_p50_s": ttfts[len(ttfts) // 2] if ttfts else float("nan"),
        "ttft_p90_s": ttfts[int(len(ttfts) * 0.9)] if ttfts else float("nan"),
        "output_tok_s": tokens / elapsed,
    }  # fmt: skip


async def engine_counters(client: httpx.AsyncClient, engine: Engine) -> dict[str, float]:
    wanted = {"vllm:prefix_cache_hits_total": "hits", "vllm:prefix_cache_queries_total": "queries",
              "vllm:request_success_total": "requests"}  # fmt: skip
    out = dict.fromkeys(wanted.values(), 0.0)
    for line in (await client.get(f"{engine.url}/metrics")).text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in wanted:
            out[wanted[name]] += float(line.rsplit(" ", 1)[1])
    return out


async def main_async(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="weir-kvbench-"))
    engines = [start_engine(core, args.blocks, workdir) for core in (0, 1)]
    gateway: subprocess.Popen[bytes] | None = None
    try:
        for engine in engines:
            wait_for(f"{engine.url}/health", 600)
        gateway, base = start_gateway(engines, workdir)
        wait_for(f"{base}/readyz", 120)
        systems, conversations = workload(args)
        results = {}
        async with httpx.AsyncClient(timeout=120) as client:
            for name in args.order.split(","):
                for engine in engines:
                    (await client.post(f"{engine.url}/reset_prefix_cache")).raise_for_status()
                await asyncio.sleep(2)  # the index hears AllBlocksCleared
                before = [await engine_counters(client, e) for e in engines]
                result = await run_strategy(client, base, name, systems, conversations, args)
                after = [await engine_counters(client, e) for e in engines]
                delta = [{k: a[k] - b[k] for k in a} for a, b in zip(after, before, strict=True)]
                hits = sum(d["hits"] for d in delta)
                queries = sum(d["queries"] for d in delta)
                per = [d["requests"] for d in delta]
                mean = sum(per) / len(per)
                result |= {
                    "prefix_cache_hit_rate": hits / queries if queries else float("nan"),
                    "requests_per_engine": per,
                    "imbalance": (max(per) - min(per)) / mean if mean else float("nan"),
                }
                results[STRATEGIES[name]] = result
                print(STRATEGIES[name], json.dumps(result), flush=True)
            text = (await client.get(f"{base}/metrics")).text
        kv_metrics = [line for line in text.splitlines()
                      if line.startswith("weir_kv_route_decisions_total")]  # fmt: skip
        print("\n".join(kv_metrics))
        lo, ph, kv = (results.get(s, {}) for s in STRATEGIES.values())
        if lo and ph and kv:
            print(f"TTFT p50: least_outstanding/kv_aware = "
                  f"{lo['ttft_p50_s'] / kv['ttft_p50_s']:.2f}x, prefix_hash/kv_aware = "
                  f"{ph['ttft_p50_s'] / kv['ttft_p50_s']:.2f}x")  # fmt: skip
        (workdir / "results.json").write_text(json.dumps(results, indent=2))
        print(f"results: {workdir / 'results.json'}")
    finally:
        for process in [*(e.process for e in engines), *([gateway] if gateway else [])]:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in [*(e.process for e in engines), *([gateway] if gateway else [])]:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=8)
    parser.add_argument("--conversations", type=int, default=32)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--system-words", type=int, default=1100)  # about 1,200 tokens
    parser.add_argument("--user-words", type=int, default=40)
    # words every tenant's system prompt starts with; past ``affinity_prefix_chars`` (512)
    # prefix_hash sees one prefix for all tenants
    parser.add_argument("--preamble-words", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--window-s", type=float, default=40.0)  # conversations start within
    parser.add_argument("--gap-s", type=float, default=6.0)  # between a conversation's turns
    parser.add_argument("--blocks", type=int, default=160)  # KV blocks per engine (128 tokens)
    parser.add_argument("--order", default="lo,ph,kv")
    parser.add_argument("--seed", type=int, default=25)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
