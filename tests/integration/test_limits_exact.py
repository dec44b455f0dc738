"""Limits stay exact across gateway processes: two ``weir serve`` sharing one real Redis.

A mock engine (``bench.mock_engine``) stands in for vLLM so that thousands of requests
take seconds and faults come on demand; the gateways, the key store and the limit
scripts are the real ones, reached over HTTP.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis

from bench.config_builder import model, weir_toml
from bench.procs import stop_all, wait_for
from serving.keys.issue import KeyCreate, create_key
from serving.keys.records import KeyRecord
from serving.keys.store import RedisKeyStore
from tests import ports
from tests.redis_server import RedisServer

ADMIN = "admin-key-for-exactness"
STATIC = "static-key-for-exactness"
CLIENTS = 200
MAX_PROMPT = 64  # a one-message chat's prompt in smollm2's template is well under this
RUNS = 20
PROMPT = [{"role": "user", "content": "Count the limits."}]
DELAY_S = 2.0  # the mock holds every non-streamed answer: all admissions happen first


def gateway_toml(port: int, redis: str, policy: str, logs: Path, mock: int) -> str:
    # faults here are injected per request: no retries, no breaker trips; and a bulkhead
    # wider than the test's 200 clients
    routing = {"retries": 0, "breaker_failures": 1000000, "max_in_flight": 1000,
               "max_queue": 1000}  # fmt: skip
    return weir_toml(
        gateway={"port": port, "api_keys": [STATIC], "engine_total_timeout_s": 3,
                 "engine_idle_timeout_s": 3},
        keys={"enabled": True, "redis_url": redis, "admin_key": ADMIN},
        limits={"on_redis_down": policy, "timeout_s": 0.5, "model_tpm": {"smollm2": 100000000}},
        engines={"log_dir": logs},
        models=[
            model(
                "smollm2", "mock", url=f"http://127.0.0.1:{mock}", routing=routing,
                engine_args=["--max-model-len", "2048"], tokenizer="smollm2-135m-instruct",
            )
        ],
    )  # fmt: skip


@dataclass
class Rig:
    redis: RedisServer
    closed: str  # gateway base URLs: both share Redis; they differ only when it is down
    open: str
    work: Path

    @property
    def gateways(self) -> list[str]:
        return [self.closed, self.open]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    work = tmp_path_factory.mktemp("limits")
    server = RedisServer(work, durable=True)
    engine, mock = ports.mock_engine(
        work, "--chunks", "8", "--interval-ms", "5", "--delay-ms", str(int(DELAY_S * 1000))
    )
    procs = [engine]
    urls = []
    logs = work / "engines"
    try:
        wait_for(f"http://127.0.0.1:{mock}/health", 30)
        for policy in ("closed", "open"):
            toml = partial(gateway_toml, redis=server.url, policy=policy, logs=logs, mock=mock)
            gateway, url = ports.gateway(toml, work, f"gateway-{policy}")
            procs.append(gateway)
            urls.append(url)
        for url in urls:
            wait_for(f"{url}/readyz", 120)
        holder = Rig(server, urls[0], urls[1], work)
        yield holder
        server = holder.redis
    finally:
        stop_all(procs)
        server.stop()


def new_key(rig: Rig, **limits: Any) -> tuple[str, KeyRecord]:
    async def make() -> tuple[str, KeyRecord]:
        store = RedisKeyStore(rig.redis.url)
        try:
            return await create_key(store, KeyCreate(name="exact", **limits))
        finally:
            await store.aclose()

    return asyncio.run(make())


def fresh_window(rig: Rig, needed_s: float = 12.0) -> None:
    """Start a run where the one-minute window has time left (windows use Redis's clock)."""
    seconds, micros = redis.Redis.from_url(rig.redis.url).time()
    left = 60 - (seconds % 60 + micros / 1e6)
    if left < needed_s:
        time.sleep(left + 0.1)


def chat(max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"model": "smollm2", "messages": PROMPT, "max_tokens": max_tokens, **extra}


async def fire(
    rig: Rig, secret: str, bodies: list[dict[str, Any]], timeout_s: float = 30
) -> list[httpx.Response]:
    """Every body at once, alternating between the two gateways."""
    limits = httpx.Limits(max_connections=len(bodies) + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        return await asyncio.gather(
            *(
                client.post(
                    f"{rig.gateways[i % 2]}/v1/chat/completions",
                    json=body,
                    headers={"authorization": f"Bearer {secret}"},
                )
                for i, body in enumerate(bodies)
            )
        )


def test_request_limit_is_exact_across_two_gateways(rig: Rig) -> None:
    admitted = []
    for _ in range(RUNS):
        secret, _ = new_key(rig, rpm=50)
        fresh_window(rig)
        answers = asyncio.run(fire(rig, secret, [chat(1, stream=True)] * CLIENTS))
        statuses = [a.status_code for a in answers]
        assert set(statuses) <= {200, 429}, statuses
        admitted.append(statuses.count(200))
        refused = [a for a in answers if a.status_code == 429]
        assert all(a.headers["x-ratelimit-remaining-requests"] == "0" for a in refused)
        assert all(int(a.headers["retry-after"]) >= 1 for a in refused)
    print(f"\nadmitted per run (limit 50, {CLIENTS} clients, 2 gateways): {admitted}")
    assert admitted == [50] * RUNS


def prompt_tokens(rig: Rig) -> int:
    """The gateway's own count of PROMPT: a probe's reservation minus its max_tokens."""
    secret, _ = new_key(rig, tpm=1_000_000)
    fresh_window(rig)
    answer = asyncio.run(fire(rig, secret, [chat(1)]))[0]
    assert answer.status_code == 200
    return 1_000_000 - int(answer.headers["x-ratelimit-remaining-tokens"]) - 1


def test_token_limit_is_exact_across_two_gateways(rig: Rig) -> None:
    prompt = prompt_tokens(rig)
    limit = 5_000
    rng = random.Random(4)
    totals = []
    for _ in range(RUNS):
        secret, _ = new_key(rig, tpm=limit)
        sizes = [rng.randint(5, 120) for _ in range(CLIENTS)]
        fresh_window(rig)
        answers = asyncio.run(fire(rig, secret, [chat(s) for s in sizes]))
        assert {a.status_code for a in answers} <= {200, 429}
        reserved = [prompt + s for s, a in zip(sizes, answers, strict=True) if a.status_code == 200]
        refused = [prompt + s for s, a in zip(sizes, answers, strict=True) if a.status_code == 429]
        assert sum(reserved) <= limit
        # exact: no refused request would have fitted in what was left
        assert min(refused) > limit - sum(reserved), (sum(reserved), min(refused))
        totals.append(sum(reserved))
    print(f"\nreserved tokens admitted per run (limit {limit}, prompt {prompt}): {totals}")


async def faulty_mix(rig: Rig, secret: str) -> list[dict[str, Any]]:
    """Successes, engine failures, timeouts, broken streams and clients that leave."""
    outcomes: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=300, max_keepalive_connections=0)
    headers = {"authorization": f"Bearer {secret}"}

    async with httpx.AsyncClient(timeout=30, limits=limits) as client:

        async def plain(url: str, body: dict[str, Any], leave_after_s: float | None) -> None:
            try:
                answer = await client.post(
                    f"{url}/v1/chat/completions", json=body, headers=headers,
                    timeout=leave_after_s or 30,
                )  # fmt: skip
            except httpx.TimeoutException:
                outcomes.append({"kind": "left"})
                return
            usage = answer.json().get("usage") if answer.status_code == 200 else None
            outcomes.append({"kind": "plain", "status": answer.status_code, "usage": usage})

        async def streamed(url: str, body: dict[str, Any], leave_after: int | None) -> None:
            usage = None
            seen = 0
            async with client.stream(
                "POST", f"{url}/v1/chat/completions", headers=headers,
                json=body | {"stream": True, "stream_options": {"include_usage": True}},
            ) as answer:  # fmt: skip
                async for line in answer.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    seen += 1
                    chunk = orjson.loads(line[6:])
                    usage = chunk.get("usage") or usage
                    if leave_after is not None and seen >= leave_after:
                        # the role chunk, then content: what it was sent before leaving
                        outcomes.append({"kind": "left", "content": seen - 1})
                        return
            outcomes.append({"kind": "stream", "status": answer.status_code, "usage": usage})

        jobs = []
        for i in range(CLIENTS):
            url = rig.gateways[i % 2]
            kind = i % 8
            if kind == 0:
                jobs.append(plain(url, chat(20), None))
            elif kind == 1:
                jobs.append(streamed(url, chat(20), None))
            elif kind == 2:
                jobs.append(
                    plain(url, chat(20, messages=[{"role": "user", "content": "[fail]"}]), None)
                )
            elif kind == 3:
                jobs.append(
                    plain(url, chat(20, messages=[{"role": "user", "content": "[hang]"}]), None)
                )
            elif kind == 4:
                jobs.append(
                    streamed(url, chat(20, messages=[{"role": "user", "content": "[break]"}]), None)
                )
            elif kind == 5:
                jobs.append(plain(url, chat(20), 0.5))  # leaves while the engine works
            elif kind == 6:
                slow = chat(20, messages=[{"role": "user", "content": "[slow]"}])
                jobs.append(streamed(url, slow, 3))  # leaves mid-stream
            else:
                jobs.append(
                    streamed(url, chat(20, messages=[{"role": "user", "content": "[hang]"}]), None)
                )
        await asyncio.gather(*jobs)
    return outcomes


def test_no_reservation_leaks_after_faults(rig: Rig) -> None:
    secret, record = new_key(rig, tpm=10_000_000, max_concurrency=1000)
    fresh_window(rig, 30)
    outcomes = asyncio.run(faulty_mix(rig, secret))
    kinds = {(o["kind"], o.get("status")) for o in outcomes}
    assert ("plain", 502) in kinds  # engine failure
    assert ("plain", 504) in kinds  # engine timeout
    assert ("left", None) in kinds

    def outstanding() -> Any:
        view = httpx.get(
            f"{rig.closed}/weir/admin/limits", headers={"authorization": f"Bearer {ADMIN}"}
        ).json()
        return view["outstanding"]

    # settlement is in the background, after the answer (polled: a leaked reservation
    # stays for its 900 s lease, far past this deadline)
    deadline = time.monotonic() + 10
    while outstanding() != {"reservations": 0, "tokens": 0} and time.monotonic() < deadline:
        time.sleep(0.05)
    assert outstanding() == {"reservations": 0, "tokens": 0}
    used = sum(
        o["usage"]["total_tokens"] for o in outcomes if o.get("status") == 200 and o.get("usage")
    )
    client = redis.Redis.from_url(rig.redis.url)
    windows = client.keys(f"weir:{{rl}}:key:{record.id}:tpm:*")
    assert len(windows) == 1
    charged = int(client.get(windows[0]) or 0)
    # A stream left after content is charged its prompt and the content it was sent (one
    # chunk more may have been on its way when the client left); a request left before
    # any content, and every failure, is charged nothing.
    left = [o["content"] for o in outcomes if o["kind"] == "left" and o.get("content")]
    extra = charged - used
    assert len(left) + sum(left) <= extra <= len(left) * (MAX_PROMPT + 20), (extra, left)
    assert client.zcard(f"weir:{{rl}}:key:{record.id}:conc") == 0
    print(f"\nfault mix: {sorted(kinds, key=str)}; charged {used} tokens to answers and"
          f" {extra} to {len(left)} streams left after content, 0 outstanding")  # fmt: skip


def test_redis_down_follows_the_policy_and_recovers(rig: Rig) -> None:
    secret, _ = new_key(rig, rpm=100_000)
    stop = time.monotonic() + 9
    seen: list[tuple[float, str, int, str, float]] = []

    async def load() -> None:
        async with httpx.AsyncClient(timeout=10) as client:

            async def one(url: str, key: str) -> None:
                started = time.monotonic()
                answer = await client.post(
                    f"{url}/v1/chat/completions", json=chat(1, stream=True),
                    headers={"authorization": f"Bearer {key}"},
                )  # fmt: skip
                code = answer.json()["error"]["code"] if answer.status_code != 200 else ""
                elapsed = time.monotonic() - started
                seen.append((started, url, answer.status_code, code, elapsed))

            while time.monotonic() < stop:
                await asyncio.gather(
                    *(one(url, key) for url in rig.gateways for key in (secret, STATIC))
                )
                await asyncio.sleep(0.05)

    async def outage() -> tuple[float, float]:
        await asyncio.sleep(2)
        down = time.monotonic()
        rig.redis.kill()
        await asyncio.sleep(3)
        up = time.monotonic()
        rig.redis = await asyncio.to_thread(rig.redis.restart)
        return down, up

    async def both() -> tuple[float, float]:
        _, window = await asyncio.gather(load(), outage())
        return window

    down, up = asyncio.run(both())
    during = [s for s in seen if down + 0.3 < s[0] < up - 0.1]
    after = [s for s in seen if s[0] > up + 1.5]
    assert during
    assert after
    assert max(s[4] for s in seen) < 2.0, "a request waited on a dead Redis"
    # while down: a store key looked up in the last keys.cache_ttl_s (5 s) passes auth from
    # the gateway's key cache, then it is 503 auth_unavailable (keys.stale_s = 0: no stale
    # keys, as the Redis-down runbook says); past auth, the closed gateway refuses and the
    # open one admits against local counters
    codes = {(s[1], s[2], s[3]) for s in during}
    assert codes <= {
        (rig.closed, 503, "auth_unavailable"),
        (rig.open, 503, "auth_unavailable"),
        (rig.closed, 503, "rate_limits_unavailable"),
        (rig.open, 200, ""),
    }, codes
    assert (rig.closed, 503, "rate_limits_unavailable") in codes
    assert (rig.open, 200, "") in codes
    assert all(s[2] == 200 for s in after), {(s[1], s[2], s[3]) for s in after}
    print(
        f"\nRedis down {up - down:.1f}s: {len(during)} requests, worst latency"
        f" {max(s[4] for s in during) * 1000:.0f} ms; all {len(after)} after restart 200"
    )
