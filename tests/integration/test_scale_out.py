"""Two gateway processes in front of the same two real engine replicas, sharing Redis.

The engines are the session stack's two vLLM chat replicas; two more ``weir serve``
processes list them as remote replicas (``urls``) and share one real ``redis-server``
for keys, limits and the cache. Through both gateways: limits stay exact, tenants never
see each other's cached answers (and do see their own, whichever gateway stored it), and
a SIGKILLed replica costs no request.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from bench.config_builder import model, weir_toml
from bench.procs import stop_all, wait_for
from tests import ports
from tests.integration.stack import Stack
from tests.integration.test_replica_kill import engine_pid, replicas
from tests.redis_server import RedisServer
from tests.windows import wait_for_fresh_window

ADMIN = "admin-key-for-scale-out"


def gateway_toml(port: int, redis: str, logs: Path, engines: list[str]) -> str:
    """One of two gateways sharing ``redis`` for keys and the cache, over the same engines."""
    return weir_toml(
        gateway={"port": port, "engine_total_timeout_s": 120},
        keys={"enabled": True, "redis_url": redis, "admin_key": ADMIN},
        cache={"redis_url": redis},
        retrieval={"enabled": False},
        engines={"log_dir": logs},
        models=[model("smollm2", "135m-instruct", urls=engines, tokenizer="smollm2-135m-instruct")],
    )


@dataclass
class Tier:
    gateways: list[str]
    redis: RedisServer


@pytest.fixture(scope="module")
def tier(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tier]:
    work = tmp_path_factory.mktemp("scale-out")
    redis = RedisServer(work)
    urls = [e["base_url"] for e in replicas(stack).values()]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        bases = []
        for n in range(2):
            proc, base = ports.gateway(
                lambda p: gateway_toml(p, redis.url, work, urls), work, f"gateway-{n}"
            )
            procs.append(proc)
            bases.append(base)
        for base in bases:
            wait_for(f"{base}/readyz", timeout_s=120)
        yield Tier(bases, redis)
    finally:
        stop_all(procs)
        redis.stop()


def new_key(tier: Tier, name: str, **limits: int) -> str:
    answer = httpx.post(
        f"{tier.gateways[0]}/weir/admin/keys",
        headers={"authorization": f"Bearer {ADMIN}"},
        json={"name": name, **limits},
    )
    assert answer.status_code == 200, answer.text
    key: str = answer.json()["key"]
    return key


def body(text: str, max_tokens: int = 1) -> dict[str, object]:
    return {
        "model": "smollm2",
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }


def test_request_limits_are_exact_across_both_gateways(tier: Tier) -> None:
    key = new_key(tier, "exact", rpm=30)
    wait_for_fresh_window(20)  # every admission in one minute (Redis TIME): 30, not 60

    async def run() -> Counter[int]:
        async with httpx.AsyncClient(timeout=300) as client:
            answers = await asyncio.gather(
                *(
                    client.post(
                        f"{tier.gateways[n % 2]}/v1/chat/completions",
                        json=body(f"Say {n}."),
                        headers={"authorization": f"Bearer {key}"},
                    )
                    for n in range(80)
                )
            )
        return Counter(a.status_code for a in answers)

    statuses = asyncio.run(run())
    print(f"\nrpm=30, 80 concurrent requests over 2 gateways: {dict(statuses)}")
    assert statuses == {200: 30, 429: 50}


def stored_answers(tier: Tier) -> int:
    """How many answers the shared response cache holds."""
    with redis.Redis.from_url(tier.redis.url) as client:
        return sum(1 for _ in client.scan_iter(match="weir:cache:r:*", count=1000))


def test_cache_is_shared_by_gateways_and_never_by_tenants(tier: Tier) -> None:
    alice, bob = new_key(tier, "alice"), new_key(tier, "bob")
    a, b = tier.gateways
    seen: list[tuple[str, str, str]] = []
    with httpx.Client(timeout=300) as client:
        for n in range(5):
            ask = body(f"Name a colour, number {n}.", max_tokens=4)
            for who, key, gateway in ((alice, "alice", a), (alice, "alice", b), (bob, "bob", b)):
                stored = stored_answers(tier)
                answer = client.post(f"{gateway}/v1/chat/completions", json=ask,
                                     headers={"authorization": f"Bearer {who}"})  # fmt: skip
                assert answer.status_code == 200, answer.text
                seen.append((key, gateway, answer.headers["x-weir-cache"]))
                if answer.headers["x-weir-cache"] == "miss":
                    # a miss is stored after its answer is sent (never delaying it): wait
                    # until it is in Redis before asking the other gateway
                    deadline = time.monotonic() + 5
                    while stored_answers(tier) == stored and time.monotonic() < deadline:
                        time.sleep(0.01)
    for n in range(5):
        first, again, other = seen[3 * n : 3 * n + 3]
        assert first[2] == "miss"
        assert again[2] == "hit"  # stored by gateway A, found by gateway B
        assert other[2] == "miss"  # bob never sees alice's entry


def test_a_killed_replica_costs_no_request_through_either_gateway(stack: Stack, tier: Tier) -> None:
    key = new_key(tier, "kill")
    victim = next(iter(replicas(stack).values()))
    port = int(victim["base_url"].rsplit(":", 1)[1])
    statuses: Counter[int] = Counter()

    async def loop(client: httpx.AsyncClient, gateway: str, until: float) -> None:
        n = 0
        while time.monotonic() < until:
            answer = await client.post(
                f"{gateway}/v1/chat/completions",
                json=body(f"Count to {n % 5 + 2}.", max_tokens=8),
                headers={"authorization": f"Bearer {key}", "x-weir-cache-control": "bypass"},
            )
            statuses[answer.status_code] += 1
            n += 1

    async def run() -> None:
        async with httpx.AsyncClient(timeout=300) as client:
            until = time.monotonic() + 15
            loops = [loop(client, g, until) for g in tier.gateways for _ in range(2)]
            task = asyncio.gather(*loops)
            await asyncio.sleep(4)
            os.kill(engine_pid(stack, port), signal.SIGKILL)
            await task

    asyncio.run(run())
    print(f"\nreplica SIGKILLed under load through 2 gateways: {dict(statuses)}")
    assert set(statuses) == {200}
    assert sum(statuses.values()) >= 20
    deadline = time.monotonic() + 300  # the stack restarts it; leave it healthy for others
    while not all(r["healthy"] for r in replicas(stack).values()):
        assert time.monotonic() < deadline, replicas(stack)
        time.sleep(1)


def test_both_gateways_route_to_both_engines(stack: Stack, tier: Tier) -> None:
    auth = {"authorization": f"Bearer {new_key(tier, 'viewer')}"}
    with httpx.Client(timeout=300) as client:  # sequential: least-outstanding ties alternate
        for gateway in tier.gateways:
            for n in range(6):
                answer = client.post(
                    f"{gateway}/v1/chat/completions", json=body(f"Spread {n}."),
                    headers={**auth, "x-weir-cache-control": "bypass"},
                )  # fmt: skip
                assert answer.status_code == 200, answer.text
    for gateway in tier.gateways:
        admin = {"authorization": f"Bearer {ADMIN}"}  # engine URLs are the admin's to see
        view = httpx.get(f"{gateway}/weir/engines", headers=admin, timeout=10).json()["data"]
        assert {e["base_url"] for e in view} == {e["base_url"] for e in replicas(stack).values()}
        assert all(e["requests"] > 0 for e in view), view  # each gateway used each engine
