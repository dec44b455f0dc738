"""KV-aware routing on the real stack (smollm2 is routed ``kv_aware``): the gateway's
block hashes, from its own tokenizer, equal the ones the real engines publish, so the
tokens it predicts a replica holds are the tokens that engine then reports as prefix-cache
hits (``vllm:prefix_cache_hits``), and the repeat goes to that replica."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.integration.stack import Stack

pytestmark = pytest.mark.integration
SYSTEM = "You answer questions about the Weir gateway's routing, briefly. " * 45  # ~600 tokens


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        if head.split("{", 1)[0] == name and all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def engine_hits(stack: Stack) -> dict[str, float]:
    engines = httpx.get(f"{stack.base_url}/weir/engines", timeout=10).json()["data"]
    return {
        e["replica"]: metric(
            httpx.get(f"{e['base_url']}/metrics", timeout=10).text,
            "vllm:prefix_cache_hits_total",
        )
        for e in engines
        if e["model"] == "smollm2"
    }


def test_predicted_hits_are_the_engines_own(stack: Stack) -> None:
    body = {
        "model": "smollm2",
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Why?"}],
        "max_tokens": 1,
        "temperature": 0,
    }
    headers = {"x-weir-cache-control": "bypass"}
    url = f"{stack.base_url}/v1/chat/completions"
    first = httpx.post(url, json=body, headers=headers, timeout=120)
    assert first.status_code == 200, first.text
    prompt_tokens = first.json()["usage"]["prompt_tokens"]

    def gateway() -> str:
        return httpx.get(f"{stack.base_url}/metrics", timeout=10).text

    # the engine's BlockStored events reach the index (polled: events are asynchronous)
    deadline = time.monotonic() + 30
    while metric(gateway(), "weir_kv_index_blocks") < prompt_tokens // 128:
        assert time.monotonic() < deadline, "the index never heard the engine's blocks"
        time.sleep(0.2)

    before, hits_before = gateway(), engine_hits(stack)
    second = httpx.post(url, json=body, headers=headers, timeout=120)
    assert second.status_code == 200, second.text
    after, hits_after = gateway(), engine_hits(stack)

    predicted = metric(after, "weir_kv_predicted_hit_tokens_total", model="smollm2") - metric(
        before, "weir_kv_predicted_hit_tokens_total", model="smollm2"
    )
    decided = metric(
        after, "weir_kv_route_decisions_total", model="smollm2", reason="cache_hit"
    ) - metric(before, "weir_kv_route_decisions_total", model="smollm2", reason="cache_hit")
    gained = {r: hits_after[r] - hits_before[r] for r in hits_after}
    assert decided == 1
    assert predicted == (prompt_tokens // 128) * 128 > 0
    # the replica it went to hit exactly what was predicted (vLLM recomputes a prompt's
    # last token: a prompt of whole blocks hits one block less)
    expected = ((prompt_tokens - 1) // 128) * 128
    assert sorted(gained.values()) == [0.0, expected]
