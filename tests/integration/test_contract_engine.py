"""The contract against the real engines: counts agree, overflow never reaches vLLM,
a client leaving mid-stream stops generation, structured output validates."""

from __future__ import annotations

import json
import re
import time

import httpx
import jsonschema
import pytest

from tests.integration.stack import Stack

pytestmark = pytest.mark.integration
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
QUESTION = {"role": "user", "content": "What is the capital of France?"}


def engine_url(stack: Stack, model: str) -> str:
    engines = httpx.get(f"{stack.base_url}/weir/engines").json()["data"]
    return str(next(e["base_url"] for e in engines if e["model"] == model))


def metric(base: str, name: str, labels: str = "") -> float:
    text = httpx.get(f"{base}/metrics", timeout=60).text  # a loaded CPU engine is slow to scrape
    total = 0.0
    pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})? ([0-9.e+-]+)$")
    for line in text.splitlines():
        found = pattern.match(line)
        if found and labels in (found.group(1) or ""):
            total += float(found.group(2))
    return total


def test_prompt_counts_agree_with_the_engine(stack: Stack) -> None:
    chat = httpx.post(
        f"{stack.base_url}/v1/chat/completions",
        json={"model": "smollm2", "messages": [SYSTEM, QUESTION], "max_tokens": 1},
        timeout=60,
    ).json()
    assert chat["usage"]["prompt_tokens"] == 27  # the gateway's own count, see test_contract
    completion = httpx.post(
        f"{stack.base_url}/v1/completions",
        json={"model": "smollm2", "prompt": "Paris is", "max_tokens": 1},
        timeout=60,
    ).json()
    assert completion["usage"]["prompt_tokens"] == 2
    embeddings = httpx.post(
        f"{stack.base_url}/v1/embeddings",
        json={"model": "minilm", "input": ["a b", "hello world"]},
        timeout=60,
    ).json()
    assert embeddings["usage"]["prompt_tokens"] == 8


def test_context_lengths_agree_with_the_engine(stack: Stack) -> None:
    for model, expected in (("smollm2", 2048), ("minilm", 256)):
        cards = httpx.get(f"{engine_url(stack, model)}/v1/models").json()["data"]
        assert cards[0]["max_model_len"] == expected


def test_overflow_is_refused_before_the_engine(stack: Stack) -> None:
    engine = engine_url(stack, "smollm2")
    handler = 'handler="/v1/chat/completions"'
    before = metric(engine, "http_requests_total", handler)
    body = {"model": "smollm2", "messages": [SYSTEM, QUESTION], "max_tokens": 2040}
    response = httpx.post(f"{stack.base_url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert "2048" in error["message"]
    assert "2067" in error["message"]
    assert metric(engine, "http_requests_total", handler) == before


def test_absent_max_tokens_fills_the_context(stack: Stack) -> None:
    body = {"model": "smollm2", "messages": [SYSTEM, QUESTION], "temperature": 0}
    response = httpx.post(f"{stack.base_url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200
    assert response.json()["choices"][0]["finish_reason"] == "stop"


def chat_engines(stack: Stack) -> list[str]:
    engines = httpx.get(f"{stack.base_url}/weir/engines").json()["data"]
    return [e["base_url"] for e in engines if e["model"] == "smollm2"]


def test_leaving_mid_stream_stops_the_engine(stack: Stack) -> None:
    urls = chat_engines(stack)
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Write a very long story."}],
        "max_tokens": 1500,
        "ignore_eos": True,
        "stream": True,
    }
    busy: str | None = None
    with httpx.stream("POST", f"{stack.base_url}/v1/chat/completions", json=body, timeout=60) as r:
        lines = 0
        for line in r.iter_lines():  # read until an engine's gauge shows it generating
            lines += line.startswith("data: ")
            if lines % 10 == 0:
                busy = next((u for u in urls if metric(u, "vllm:num_requests_running") >= 1), None)
                if busy is not None:
                    break
            assert lines < 1400, "no engine ever reported the request as running"
    assert busy is not None
    left = time.monotonic()
    while metric(busy, "vllm:num_requests_running") > 0 and time.monotonic() - left < 10:
        time.sleep(0.05)
    stopped_after = time.monotonic() - left
    assert metric(busy, "vllm:num_requests_running") == 0
    # generation stopped: the engine's token counter no longer moves
    before = metric(busy, "vllm:generation_tokens_total")
    time.sleep(1.0)
    assert metric(busy, "vllm:generation_tokens_total") == before
    assert stopped_after < 3.0, stopped_after


def test_json_schema_output_validates(stack: Stack) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    body = {
        "model": "smollm2",
        "messages": [SYSTEM, {"role": "user", "content": "Name the capital of France as JSON."}],
        "temperature": 0,
        "max_tokens": 60,
        "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
    }
    response = httpx.post(f"{stack.base_url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    assert response.headers["x-weir-output-valid"] == "true"
    content = json.loads(response.json()["choices"][0]["message"]["content"])
    jsonschema.validate(content, schema)
