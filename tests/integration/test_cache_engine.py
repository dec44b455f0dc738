"""The caches with the real engines and a real Redis (its own server, killed at the end).

A second gateway runs in front of the session stack's engines, with keys in one Redis
and the cache in another, so the cache can be stopped without touching anything else.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis

from bench.config_builder import model, weir_toml
from bench.procs import stop_all, wait_for
from serving.keys.issue import KeyCreate, create_key
from serving.keys.store import RedisKeyStore
from tests import ports
from tests.integration.stack import Stack
from tests.redis_server import RedisServer

pytestmark = pytest.mark.integration


def config(port: int, keys: str, cache: str, chat: list[str], embed: list[str]) -> str:
    return weir_toml(
        gateway={"port": port},
        keys={"enabled": True, "redis_url": keys},
        cache={"redis_url": cache, "timeout_s": 0.2},
        models=[
            model("smollm2", "135m-instruct", urls=chat, tokenizer="smollm2-135m-instruct"),
            model("minilm", "l6-v2", task="embed", urls=embed, tokenizer="all-minilm-l6-v2"),
        ],
    )


@dataclass
class Rig:
    base: str
    engines: list[str]
    cache: RedisServer
    keys: list[dict[str, str]]


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": "smollm2",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": content},
        ],
        "temperature": 0,
        "max_tokens": 6,
        **extra,
    }


@pytest.fixture(scope="module")
def rig(stack: Stack, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    work = tmp_path_factory.mktemp("cache")
    cache = RedisServer(work)
    engines = httpx.get(f"{stack.base_url}/weir/engines").json()["data"]
    chat_urls = [e["base_url"] for e in engines if e["model"] == "smollm2"]
    embed_urls = [e["base_url"] for e in engines if e["model"] == "minilm"]

    async def make_keys() -> list[dict[str, str]]:
        store = RedisKeyStore(redis_url)
        made = [await create_key(store, KeyCreate(name=f"tenant-{n}")) for n in range(2)]
        await store.aclose()
        return [{"authorization": f"Bearer {secret}"} for secret, _ in made]

    keys = asyncio.run(make_keys())
    proc, base = ports.gateway(
        lambda port: config(port, redis_url, cache.url, chat_urls, embed_urls), work, "gateway"
    )
    try:
        wait_for(f"{base}/readyz", 120)
        yield Rig(base, chat_urls, cache, keys)
    finally:
        stop_all([proc])
        cache.stop()


def generated_tokens(rig: Rig) -> float:
    total = 0.0
    for url in rig.engines:
        text = httpx.get(f"{url}/metrics").text
        found = re.findall(r"^vllm:generation_tokens_total\{[^}]*\} ([0-9.e+]+)$", text, re.M)
        total += sum(float(v) for v in found)
    return total


def cache_entries(rig: Rig) -> int:
    with redis.Redis.from_url(rig.cache.url) as client:
        return int(client.dbsize())


def wait_stored(rig: Rig, entries_before: int) -> None:
    """An answer is stored in the background, after it is sent: wait until it is."""
    deadline = time.monotonic() + 10
    while cache_entries(rig) <= entries_before and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_hit_never_reaches_the_engine(rig: Rig) -> None:
    body = chat("Name a colour.")
    with httpx.Client(base_url=rig.base, headers=rig.keys[0], timeout=60) as client:
        entries = cache_entries(rig)
        miss = client.post("/v1/chat/completions", json=body)
        assert miss.headers["x-weir-cache"] == "miss"
        wait_stored(rig, entries)
        before = generated_tokens(rig)
        hit = client.post("/v1/chat/completions", json=body)
        assert hit.headers["x-weir-cache"] == "hit"
        assert generated_tokens(rig) == before  # vllm:generation_tokens_total did not move
    assert hit.json()["choices"][0]["message"] == miss.json()["choices"][0]["message"]


def test_tenants_never_see_each_others_entries(rig: Rig) -> None:
    prompts = [f"Say the number {n}." for n in range(20)]
    order = list(itertools.islice(itertools.cycle(itertools.product(range(2), prompts)), 1000))
    seen: dict[tuple[int, str], list[tuple[str, str]]] = {}

    async def run() -> None:
        limits = httpx.Limits(max_connections=16)
        async with httpx.AsyncClient(base_url=rig.base, timeout=120, limits=limits) as client:
            gate = asyncio.Semaphore(16)

            async def one(tenant: int, prompt: str) -> None:
                async with gate:
                    answer = await client.post(
                        "/v1/chat/completions", json=chat(prompt), headers=rig.keys[tenant]
                    )
                answer.raise_for_status()
                content = answer.json()["choices"][0]["message"]["content"]
                seen.setdefault((tenant, prompt), []).append(
                    (answer.headers["x-weir-cache"], content)
                )

            # each tenant's first request per prompt goes first, then the rest at once
            await asyncio.gather(*(one(t, p) for t, p in order[:40]))
            await asyncio.gather(*(one(t, p) for t, p in order[40:]))

    asyncio.run(run())
    assert sum(len(v) for v in seen.values()) == 1000
    cross_hits = sum(results[0][0] == "hit" for results in seen.values())
    assert cross_hits == 0  # every tenant's first ask of every prompt was its own miss
    for results in seen.values():
        assert [r[0] for r in results[1:]] == ["hit"] * (len(results) - 1)
        assert len({r[1] for r in results}) == 1


def test_parameters_and_streams(rig: Rig) -> None:
    base = chat("Name a fruit.")
    with httpx.Client(base_url=rig.base, headers=rig.keys[0], timeout=60) as client:
        assert client.post("/v1/chat/completions", json=base).headers["x-weir-cache"] == "miss"
        for change in ({"max_tokens": 5}, {"top_p": 0.9}, {"seed": 3}, {"stop": ["."]}):
            answer = client.post("/v1/chat/completions", json=base | change)
            assert answer.headers["x-weir-cache"] == "miss", change
        stored = client.post("/v1/chat/completions", json=base).json()
        with client.stream("POST", "/v1/chat/completions", json=base | {"stream": True}) as s:
            assert s.headers["x-weir-cache"] == "hit"
            lines = [x for x in s.iter_lines() if x.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        replayed = "".join(
            c["choices"][0]["delta"].get("content") or ""
            for c in (httpx.Response(200, content=x[6:]).json() for x in lines[:-1])
            if c["choices"]
        )
        assert replayed == stored["choices"][0]["message"]["content"]
        # a stream the client leaves midway is not stored
        left = chat("Write a long story about a lighthouse.", max_tokens=200)
        with client.stream("POST", "/v1/chat/completions", json=left | {"stream": True}) as s:
            for n, _ in enumerate(s.iter_lines()):
                if n > 4:
                    break
        after = client.post("/v1/chat/completions", json=left | {"max_tokens": 200})
        assert after.headers["x-weir-cache"] == "miss"


def test_embeddings_reuse_cached_vectors(rig: Rig) -> None:
    texts = [f"document number {n} about caching" for n in range(64)]
    with httpx.Client(base_url=rig.base, headers=rig.keys[0], timeout=60) as client:
        first = client.post("/v1/embeddings", json={"model": "minilm", "input": texts[:32]})
        assert first.headers["x-weir-cache"] == "miss"
        # vectors are stored in the background, after the answer: wait until all 32 are
        # (asking again stores what is missing; the other 32 texts stay unasked)
        deadline = time.monotonic() + 10
        while True:
            again = client.post("/v1/embeddings", json={"model": "minilm", "input": texts[:32]})
            if again.headers["x-weir-cache-hits"] == "32/32" or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert again.headers["x-weir-cache-hits"] == "32/32"
        mixed = client.post("/v1/embeddings", json={"model": "minilm", "input": texts})
        assert mixed.headers["x-weir-cache-hits"] == "32/64"
        fresh = client.post(
            "/v1/embeddings", json={"model": "minilm", "input": texts},
            headers={"x-weir-cache-control": "bypass"},
        )  # fmt: skip
    a = [d["embedding"] for d in mixed.json()["data"]]
    b = [d["embedding"] for d in fresh.json()["data"]]
    assert len(a) == 64
    # the engine runs in bfloat16: a vector computed in another batch differs in the last
    # bits, so compare directions
    for va, vb in zip(a, b, strict=True):
        dot = sum(x * y for x, y in zip(va, vb, strict=True))
        norms = sum(x * x for x in va) ** 0.5 * sum(y * y for y in vb) ** 0.5
        assert dot / norms > 0.999
    assert mixed.json()["usage"]["prompt_tokens"] == fresh.json()["usage"]["prompt_tokens"]


def cache_errors(base: str) -> dict[str, float]:
    """weir_cache_requests_total{result="error"} by kind, read from the gateway."""
    text = httpx.get(f"{base}/metrics", timeout=30).text
    found = re.findall(
        r'^weir_cache_requests_total\{kind="(\w+)",result="error"\} ([0-9.e+]+)$', text, re.M
    )
    return {kind: float(value) for kind, value in found}


def test_cache_redis_killed_fails_nothing(rig: Rig) -> None:
    before = cache_errors(rig.base)  # the counter runs over the whole module: a delta
    rig.cache.kill()
    with httpx.Client(base_url=rig.base, headers=rig.keys[1], timeout=60) as client:
        for n in range(5):
            answer = client.post("/v1/chat/completions", json=chat(f"Count to {n}."))
            assert answer.status_code == 200
            assert answer.headers["x-weir-cache"] == "miss"
        embedded = client.post("/v1/embeddings", json={"model": "minilm", "input": ["a", "b"]})
        assert embedded.status_code == 200
    # each chat request: its lookup and its store (written after the answer went out);
    # the embedding request: 2 texts looked up and 2 stored
    expected = {"response": 10.0, "embedding": 4.0}

    def counted() -> dict[str, float]:
        now = cache_errors(rig.base)
        return {kind: now.get(kind, 0.0) - before.get(kind, 0.0) for kind in expected}

    deadline = time.monotonic() + 10
    while counted() != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert counted() == expected


def test_limits_settle_to_the_engines_usage_and_metrics_count_it(rig: Rig, redis_url: str) -> None:
    """Token limits against the real engine: a reservation (prompt + max_tokens) is settled
    to what vLLM reports, for plain and streamed answers, and the metrics agree."""

    async def limited_key() -> dict[str, str]:
        store = RedisKeyStore(redis_url)
        secret, _ = await create_key(store, KeyCreate(name="limited", tpm=100_000))
        await store.aclose()
        return {"authorization": f"Bearer {secret}"}

    auth = asyncio.run(limited_key())
    into = time.time() % 60  # token windows are wall-clock minutes (Redis TIME): the three
    if into > 30:  # requests must land in one, or the third sees a fresh, empty window
        time.sleep(60 - into + 0.5)
    body = chat("Tell me about the sea.", max_tokens=20, temperature=0.5)  # not cached
    with httpx.Client(base_url=rig.base, headers=auth, timeout=60) as client:
        counted_before = completion_tokens_counted(client.get("/metrics").text)
        first = client.post("/v1/chat/completions", json=body)
        used = first.json()["usage"]["total_tokens"]
        reserved = 100_000 - int(first.headers["x-ratelimit-remaining-tokens"])
        assert reserved == first.json()["usage"]["prompt_tokens"] + 20  # exact prompt + max
        with client.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as s:
            assert not any('"usage"' in line for line in s.iter_lines())  # not asked: hidden
        third = client.post("/v1/chat/completions", json=body)
        remaining = int(third.headers["x-ratelimit-remaining-tokens"])
        # the first answer was settled to its real usage, the stream to its own (prompt
        # plus 1..20 tokens); the third shows its own reservation on top
        prompt = first.json()["usage"]["prompt_tokens"]
        charged = 100_000 - remaining - reserved
        assert used + prompt + 1 <= charged <= used + prompt + 20
        counted = completion_tokens_counted(client.get("/metrics").text) - counted_before
    # these three requests' completion tokens, no more: the stream's own (1..20) is hidden
    answered = (
        first.json()["usage"]["completion_tokens"] + third.json()["usage"]["completion_tokens"]
    )
    assert answered + 1 <= counted <= answered + 20


def completion_tokens_counted(metrics: str) -> float:
    found = re.search(
        r'tokens_used_total\{model="smollm2",model_version="135m-instruct",type="completion"\}'
        r" ([0-9.e+]+)",
        metrics,
    )
    return float(found.group(1)) if found is not None else 0.0
