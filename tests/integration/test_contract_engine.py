"""The contract against the real engines: counts agree, overflow never reaches vLLM,
a client leaving mid-stream stops generation, structured output validates."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Callable

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


LONG = 1500  # tokens asked for (ignore_eos): minutes of generation on a CPU engine


def finished_requests(base: str) -> float:
    """Requests the engine finished by generating (stop or length), aborts excluded."""
    return sum(
        metric(base, "vllm:request_success_total", f'finished_reason="{reason}"')
        for reason in ("stop", "length")
    )


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll: vLLM publishes its gauges on its own stats tick (seconds apart on CPU)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def leave_mid_generation(stack: Stack, stream: bool) -> None:
    """Ask one chat engine for LONG tokens, leave once vLLM reports the request running,
    then check in vLLM's own counters that it was aborted: nothing running any more, no
    request finished by generating, far fewer tokens generated than asked."""
    urls = chat_engines(stack)
    assert all(metric(u, "vllm:num_requests_running") == 0 for u in urls)
    finished = {u: finished_requests(u) for u in urls}
    generated = {u: metric(u, "vllm:generation_tokens_total") for u in urls}
    body = json.dumps({
        "model": "smollm2", "messages": [{"role": "user", "content": "Write a very long story."}],
        "max_tokens": LONG, "ignore_eos": True, "stream": stream,
    }).encode()  # fmt: skip
    host, port = stack.base_url.removeprefix("http://").split(":")
    busy: list[str] = []
    with socket.create_connection((host, int(port))) as client:  # a client that hangs up
        client.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\ncontent-type: application/json"
            b"\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
        )

        def running() -> bool:
            busy[:] = [u for u in urls if metric(u, "vllm:num_requests_running") >= 1]
            return bool(busy)

        wait_until(running, 120, "no engine ever reported the request as running")
    engine = busy[0]
    wait_until(lambda: metric(engine, "vllm:num_requests_running") == 0, 60,
               "the engine still runs the request its client left")  # fmt: skip
    made = metric(engine, "vllm:generation_tokens_total") - generated[engine]
    aborts = metric(engine, "vllm:request_success_total", 'finished_reason="abort"')
    kind = "stream" if stream else "plain"
    print(f"\nclient left ({kind}): the engine generated {made:g} of {LONG} tokens;"
          f" vLLM's abort count {aborts:g}")  # fmt: skip
    assert finished_requests(engine) == finished[engine]  # it never finished generating
    assert made < LONG
    assert all(finished_requests(u) == finished[u] for u in urls)


def test_leaving_mid_stream_aborts_the_request_in_the_engine(stack: Stack) -> None:
    leave_mid_generation(stack, stream=True)


def test_leaving_a_plain_request_aborts_it_in_the_engine(stack: Stack) -> None:
    """The unit tests count the fake's cancellations; this is vLLM's own account."""
    leave_mid_generation(stack, stream=False)


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
