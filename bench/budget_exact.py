"""Money budgets are exact across gateway processes: a $1.00 budget, 200 clients at once.

Two ``weir serve`` share one ``redis-server`` (keys and limits) in front of a mock engine
(``bench.mock_engine``, every answer taking 3 s so that every admission comes before the
first settlement) with a real tokenizer, so a request's prompt is
counted as in production. Each run makes a key with a total budget of $1.00 and sends
``--clients`` chat requests at once, alternating between the gateways: random prompts
(four lengths) and random ``max_tokens``, a quarter of them streamed. A request's worst
case is its prompt plus ``max_tokens`` at the price, read from the gateway itself (a
probe key whose budget holds nothing answers 429 with ``x-weir-budget-needed-usd``).

Each run checks:

- reserved: the worst cases of the admitted requests add up to at most $1.00;
- exact: no refused request would have fitted in what the admitted ones left, and each
  refusal's ``x-weir-budget-remaining-usd`` is less than what it needed;
- spent: once every request is settled, the key's budget counter in Redis equals the cost
  of what the engine reported (usage at the price) and is at most $1.00, and the two
  gateways' ledgers (``GET /weir/admin/usage?key=``) hold one row per request and the
  same cost.

Black-box: ``weir`` and ``redis-server`` as commands, HTTP, and Redis read for the
budget's counter. ``run`` is what the integration test calls (a few runs).

    python -m bench.budget_exact [--runs 20] [--clients 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import redis

from bench.config_builder import model, weir_toml
from bench.procs import free_port, start, start_gateway, stop_all, wait_for

ADMIN = "admin-key-for-budget-exactness"
BUDGET_NANO = 1_000_000_000  # $1.00
NANO = 1_000_000_000
# integer nano-dollars per token, so every cost is exact: $30 and $150 per million
PROMPT_PER_M, COMPLETION_PER_M = 30.0, 150.0
PROMPT_NANO, COMPLETION_NANO = 30_000, 150_000
STREAM_CHUNKS = 8  # the mock's chunks per stream (its usage: completion_tokens 8)
SENTENCE = "the budget holds what every request may cost at most and no more "
PROMPTS = [(SENTENCE * 20)[: n * 5].strip() for n in (3, 25, 80, 200)]  # ~n words
# every answer takes 3 s (a non-streamed one held, a stream's 8 chunks 400 ms apart), so
# every admission is decided before the first settlement gives money back
DELAY_MS = 3000
INTERVAL_MS = 400


def gateway_toml(port: int, redis_url: str, mock: int, work: Path, name: str) -> str:
    routing = {"retries": 0, "breaker_failures": 1_000_000, "max_in_flight": 1000,
               "max_queue": 1000}  # fmt: skip
    return weir_toml(
        gateway={"port": port, "engine_total_timeout_s": 30, "engine_idle_timeout_s": 30},
        keys={"enabled": True, "redis_url": redis_url, "admin_key": ADMIN},
        limits={"on_redis_down": "closed", "timeout_s": 2.0},
        engines={"log_dir": work / "engines"},
        billing={"prices": [{"model": "smollm2", "prompt_per_m": PROMPT_PER_M,
                             "completion_per_m": COMPLETION_PER_M}]},
        ledger={"path": str(work / f"ledger-{name}.db"), "spill_dir": str(work / f"spill-{name}"),
                "flush_interval_s": 0.1},
        models=[
            model("smollm2", "mock", url=f"http://127.0.0.1:{mock}", routing=routing,
                  engine_args=["--max-model-len", "4096"], tokenizer="smollm2-135m-instruct")
        ],
    )  # fmt: skip


def mock_args() -> list[str]:
    return ["--chunks", str(STREAM_CHUNKS), "--interval-ms", str(INTERVAL_MS),
            "--delay-ms", str(DELAY_MS)]  # fmt: skip


def nano(text: str) -> int:
    """``0.012345678`` (the gateway's exact dollars) as nano-dollars."""
    whole, _, frac = text.partition(".")
    return int(whole) * NANO + int((frac + "0" * 9)[:9])


@dataclass
class Request:
    prompt: int  # index in PROMPTS
    max_tokens: int
    stream: bool
    worst: int = 0  # nano-dollars, the gateway's own figure

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": "smollm2",
            "messages": [{"role": "user", "content": PROMPTS[self.prompt]}],
            "max_tokens": self.max_tokens,
        }
        if self.stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        return body


@dataclass
class Outcome:
    status: int
    usage: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    done: float = field(default_factory=time.monotonic)  # when the client had it all


class Admin:
    def __init__(self, base: str) -> None:
        self.base = base
        self.headers = {"authorization": f"Bearer {ADMIN}"}

    def key(self, budget_total: float) -> tuple[str, str]:
        made = httpx.post(
            f"{self.base}/weir/admin/keys", headers=self.headers, timeout=10,
            json={"name": "budget-exact", "budget_total": budget_total},
        )  # fmt: skip
        made.raise_for_status()
        found = made.json()
        return str(found["key"]), str(found["id"])

    def outstanding(self) -> Any:
        view = httpx.get(f"{self.base}/weir/admin/limits", headers=self.headers, timeout=10)
        view.raise_for_status()
        return view.json()["outstanding"]

    def usage(self, key_id: str) -> dict[str, Any]:
        found = httpx.get(
            f"{self.base}/weir/admin/usage", headers=self.headers, timeout=10,
            params={"key": key_id, "since": "1h", "by": "key"},
        )  # fmt: skip
        found.raise_for_status()
        total: dict[str, Any] = found.json()["total"]
        return total


def worst_cases(gateway: str, admin: Admin) -> dict[int, int]:
    """The nano-dollars the gateway reserves for each prompt's tokens (max_tokens 1)."""
    secret, _ = admin.key(1e-9)  # holds one nano-dollar: refuses everything, says its need
    prompts = {}
    for i in range(len(PROMPTS)):
        answer = httpx.post(
            f"{gateway}/v1/chat/completions", json=Request(i, 1, False).body(), timeout=30,
            headers={"authorization": f"Bearer {secret}"},
        )  # fmt: skip
        if answer.status_code != 429:
            raise RuntimeError(f"probe: {answer.status_code} {answer.text[:200]}")
        prompts[i] = nano(answer.headers["x-weir-budget-needed-usd"]) - COMPLETION_NANO
    return prompts


async def fire(gateways: list[str], secret: str, requests: list[Request]) -> list[Outcome]:
    """Every request at once, alternating between the gateways."""
    limits = httpx.Limits(max_connections=len(requests) + 10, max_keepalive_connections=0)
    headers = {"authorization": f"Bearer {secret}"}
    async with httpx.AsyncClient(timeout=60, limits=limits, headers=headers) as client:

        async def one(i: int, request: Request) -> Outcome:
            url = f"{gateways[i % len(gateways)]}/v1/chat/completions"
            if not request.stream:
                answer = await client.post(url, json=request.body())
                usage = answer.json().get("usage") if answer.status_code == 200 else None
                return Outcome(answer.status_code, usage, dict(answer.headers))
            usage = None
            async with client.stream("POST", url, json=request.body()) as answer:
                async for line in answer.aiter_lines():
                    if line.startswith("data: {"):
                        usage = orjson.loads(line[6:]).get("usage") or usage
            return Outcome(answer.status_code, usage, dict(answer.headers))

        return await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))


def cost(usage: dict[str, Any]) -> int:
    return int(usage["prompt_tokens"]) * PROMPT_NANO + int(usage["completion_tokens"]) * (
        COMPLETION_NANO
    )


def one_run(
    gateways: list[str], admin: Admin, redis_url: str, rng: random.Random, clients: int,
    prompts: dict[int, int],
) -> dict[str, Any]:  # fmt: skip
    secret, key_id = admin.key(BUDGET_NANO / NANO)
    requests = [
        Request(rng.randrange(len(PROMPTS)), rng.randint(8, 120), rng.random() < 0.25)
        for _ in range(clients)
    ]
    for r in requests:
        r.worst = prompts[r.prompt] + r.max_tokens * COMPLETION_NANO
    outcomes = asyncio.run(fire(gateways, secret, requests))
    statuses = [o.status for o in outcomes]
    if not set(statuses) <= {200, 429}:
        raise AssertionError(f"unexpected statuses: {sorted(set(statuses))}")
    admitted = [r for r, o in zip(requests, outcomes, strict=True) if o.status == 200]
    refused = [(r, o) for r, o in zip(requests, outcomes, strict=True) if o.status == 429]
    reserved = sum(r.worst for r in admitted)
    first_answer = min((o.done for o in outcomes if o.status == 200), default=math.inf)
    last_refusal = max((o.done for o in outcomes if o.status == 429), default=0.0)
    # every refusal said what it needed (its worst case) and that less was left
    for r, o in refused:
        if o.headers.get("x-weir-budget") != "key:total":
            raise AssertionError(f"refused by something else: {o.headers}")
        if nano(o.headers["x-weir-budget-needed-usd"]) != r.worst:
            raise AssertionError(f"needed {o.headers['x-weir-budget-needed-usd']} != {r.worst}")
        if nano(o.headers["x-weir-budget-remaining-usd"]) >= r.worst:
            raise AssertionError(f"refused with enough left: {o.headers}")
    # settlement is in the background after each answer: wait until none is outstanding
    deadline = time.monotonic() + 30
    while admin.outstanding()["reservations"] and time.monotonic() < deadline:
        time.sleep(0.05)
    expected = sum(cost(o.usage) for o in outcomes if o.status == 200 and o.usage)
    missing_usage = sum(1 for o in outcomes if o.status == 200 and not o.usage)
    counter = redis.Redis.from_url(redis_url)
    try:
        spent = int(counter.get(f"weir:{{rl}}:budget:key:{key_id}:total") or 0)
    finally:
        counter.close()
    ledger = [Admin(g).usage(key_id) for g in gateways]
    return {
        "admitted": len(admitted),
        "refused": len(refused),
        "reserved_nano": reserved,
        "left_nano": BUDGET_NANO - reserved,
        "smallest_refused_nano": min((r.worst for r, _ in refused), default=None),
        "spent_nano": spent,
        "usage_cost_nano": expected,
        "admitted_without_usage": missing_usage,
        "ledger_rows": sum(int(t["requests"]) for t in ledger),
        "ledger_cost_nano": sum(int(t["cost_nano"]) for t in ledger),
        "outstanding": admin.outstanding(),
        # settlements come after answers: every refusal was decided with nothing given back
        "refusals_before_settlements": last_refusal < first_answer,
    }


def check(result: dict[str, Any], clients: int) -> list[str]:
    """What is wrong with one run's result (nothing: exact)."""
    wrong = []
    if result["reserved_nano"] > BUDGET_NANO:
        wrong.append(f"reserved {result['reserved_nano']} > budget")
    smallest = result["smallest_refused_nano"]
    if smallest is not None and smallest <= result["left_nano"]:
        wrong.append(f"refused {smallest} with {result['left_nano']} left")
    if result["spent_nano"] > BUDGET_NANO:
        wrong.append(f"spent {result['spent_nano']} > budget")
    if result["spent_nano"] != result["usage_cost_nano"]:
        wrong.append(f"spent {result['spent_nano']} != usage cost {result['usage_cost_nano']}")
    if result["admitted_without_usage"]:
        wrong.append(f"{result['admitted_without_usage']} answers without usage")
    if result["ledger_rows"] != clients:
        wrong.append(f"ledger rows {result['ledger_rows']} != {clients}")
    if result["ledger_cost_nano"] != result["spent_nano"]:
        wrong.append(f"ledger cost {result['ledger_cost_nano']} != spent {result['spent_nano']}")
    if result["outstanding"] != {"reservations": 0, "tokens": 0}:
        wrong.append(f"outstanding {result['outstanding']}")
    if not result["refusals_before_settlements"]:
        wrong.append("a refusal came after the first answer: not every admission was decided")
    if result["refused"] == 0:
        wrong.append("nothing refused: the budget never bound")
    return wrong


def run(
    gateways: list[str], redis_url: str, runs: int, clients: int = 200, seed: int = 24
) -> dict[str, Any]:
    """``runs`` runs of ``clients`` requests against a fresh $1.00 key each; every run's
    figures and what was wrong with it (``failures``)."""
    admin = Admin(gateways[0])
    prompts = worst_cases(gateways[0], admin)
    rng = random.Random(seed)
    results = []
    for _ in range(runs):
        result = one_run(gateways, admin, redis_url, rng, clients, prompts)
        result["wrong"] = check(result, clients)
        results.append(result)
    return {
        "budget_nano": BUDGET_NANO,
        "clients": clients,
        "prompt_worst_nano": prompts,
        "runs": results,
        "failures": sum(1 for r in results if r["wrong"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--out", default="bench-results/budget_exact.json")
    args = parser.parse_args()
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    work = Path(tempfile.mkdtemp(prefix="weir-budget-"))
    redis_port, mock_port = free_port(), free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    redis_cmd = [binary, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(work)]  # fmt: skip
    procs: list[subprocess.Popen[bytes]] = [
        start(redis_cmd, work / "redis.log"),
        start([sys.executable, "-m", "bench.mock_engine", "--port", str(mock_port),
               *mock_args()], work / "mock.log"),
    ]  # fmt: skip
    gateways = []
    for name in ("a", "b"):
        port = free_port()
        procs.append(
            start_gateway(gateway_toml(port, redis_url, mock_port, work, name), work, name)
        )
        gateways.append(f"http://127.0.0.1:{port}")
    try:
        wait_for(f"http://127.0.0.1:{mock_port}/health")
        for base in gateways:
            wait_for(f"{base}/readyz", 120)
        started = time.monotonic()
        result = run(gateways, redis_url, args.runs, args.clients)
        result["seconds"] = round(time.monotonic() - started, 1)
    finally:
        stop_all(procs)
    report(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"written to {out}")
    if result["failures"]:
        raise SystemExit(1)


def report(result: dict[str, Any]) -> None:
    runs = result["runs"]
    dollars = [r["spent_nano"] / NANO for r in runs]
    print(f"budget ${result['budget_nano'] / NANO:.2f}, {result['clients']} clients x"
          f" {len(runs)} runs over 2 gateways")  # fmt: skip
    for i, r in enumerate(runs, 1):
        wrong = f"  WRONG: {'; '.join(r['wrong'])}" if r["wrong"] else ""
        print(
            f"run {i:2}: admitted {r['admitted']:3}, refused {r['refused']:3}, reserved"
            f" ${r['reserved_nano'] / NANO:.6f} (left ${r['left_nano'] / NANO:.6f}, smallest"
            f" refused ${(r['smallest_refused_nano'] or 0) / NANO:.6f}), spent"
            f" ${r['spent_nano'] / NANO:.6f}, ledger {r['ledger_rows']} rows"
            f" ${r['ledger_cost_nano'] / NANO:.6f}{wrong}"
        )
    print(f"spent: max ${max(dollars):.6f}, min ${min(dollars):.6f};"
          f" runs with a fault: {result['failures']}")  # fmt: skip


if __name__ == "__main__":
    main()
