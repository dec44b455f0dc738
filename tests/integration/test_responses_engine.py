"""The Responses API through the official ``openai`` client, against the real engines.

Two more ``weir serve`` processes front the session stack's vLLM chat replicas and share
one real ``redis-server`` for keys and stored responses (``responses.redis_url`` defaults
to ``keys.redis_url``): a response created through one gateway is retrieved and continued
through the other, and is a 404 for another key. Every body and stream event is checked
against OpenAI's spec.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import openai
import orjson
import pytest

from bench.procs import stop_all, wait_for
from tests import ports
from tests.integration.stack import Stack
from tests.integration.test_replica_kill import replicas
from tests.integration.test_scale_out import Tier, gateway_toml, new_key
from tests.openai_spec import validate, validate_response_event
from tests.redis_server import RedisServer

pytestmark = pytest.mark.integration
QUESTION = "What is the capital of France? Answer in one word."


@pytest.fixture(scope="module")
def tier(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tier]:
    work: Path = tmp_path_factory.mktemp("responses")
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


def sdk(gateway: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key=key, max_retries=0, timeout=120)


def test_create_plain(tier: Tier) -> None:
    key = new_key(tier, "plain")
    answer = sdk(tier.gateways[0], key).responses.create(
        model="smollm2", input=QUESTION, instructions="You are a helpful assistant.",
        max_output_tokens=16, temperature=0,
    )  # fmt: skip
    assert "Paris" in answer.output_text
    assert answer.status in ("completed", "incomplete")
    assert answer.usage is not None
    assert answer.usage.output_tokens > 0
    raw = httpx.get(f"{tier.gateways[1]}/v1/responses/{answer.id}",
                    headers={"authorization": f"Bearer {key}"}, timeout=30)  # fmt: skip
    assert raw.status_code == 200
    validate("Response", raw.json())
    assert raw.json()["output"][0]["content"][0]["text"] == answer.output_text


def test_create_streamed_events_validate(tier: Tier) -> None:
    key = new_key(tier, "stream")
    body = {"model": "smollm2", "input": QUESTION, "max_output_tokens": 16, "stream": True,
            "temperature": 0}  # fmt: skip
    events = []
    with httpx.stream("POST", f"{tier.gateways[0]}/v1/responses", json=body, timeout=120,
                      headers={"authorization": f"Bearer {key}"}) as response:  # fmt: skip
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(orjson.loads(line[6:]))
    for n, event in enumerate(events):
        validate_response_event(event)
        assert event["sequence_number"] == n
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]  # fmt: skip
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert kinds.count("response.output_text.delta") > 1
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == text
    assert "Paris" in text
    # the SDK's own folding of the events gives the same answer
    client = sdk(tier.gateways[1], key)
    with client.responses.stream(model="smollm2", input=QUESTION, max_output_tokens=64,
                                 temperature=0) as stream:  # fmt: skip
        final = stream.get_final_response()
    assert "Paris" in final.output_text


def test_previous_response_id_across_gateways_and_tenants(tier: Tier) -> None:
    alice, bob = new_key(tier, "alice-r"), new_key(tier, "bob-r")
    a, b = sdk(tier.gateways[0], alice), sdk(tier.gateways[1], alice)
    first = a.responses.create(model="smollm2", input="My name is Ada. Say hello to me.",
                               max_output_tokens=16, temperature=0)  # fmt: skip
    second = b.responses.create(model="smollm2", input="What is my name?",
                                previous_response_id=first.id, max_output_tokens=16,
                                temperature=0)  # fmt: skip
    assert second.previous_response_id == first.id
    assert first.usage is not None
    assert second.usage is not None
    # the engine saw the first turn and its answer before the new question
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    items = b.responses.input_items.list(second.id)
    assert [i.type for i in items.data] == ["message"]
    intruder = sdk(tier.gateways[1], bob)
    with pytest.raises(openai.NotFoundError):
        intruder.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        intruder.responses.create(model="smollm2", input="Hi", previous_response_id=first.id)
    with pytest.raises(openai.NotFoundError):
        intruder.responses.delete(first.id)
    a.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        b.responses.retrieve(first.id)
    assert b.responses.retrieve(second.id).id == second.id  # its own record stays


WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
    "additionalProperties": False,
}


def test_create_with_a_required_function_tool(tier: Tier) -> None:
    key = new_key(tier, "tools-r")
    answer = sdk(tier.gateways[0], key).responses.create(
        model="smollm2", input="What is the weather in Paris right now?", temperature=0,
        max_output_tokens=80, tool_choice="required",
        tools=[{"type": "function", "name": "get_weather", "strict": False,
                "description": "Get the current weather in a city",
                "parameters": WEATHER_PARAMETERS}],
        extra_headers={"x-weir-cache-control": "bypass"},
    )  # fmt: skip
    calls = [item for item in answer.output if item.type == "function_call"]
    assert calls, answer.output
    assert calls[0].name == "get_weather"
    arguments = orjson.loads(calls[0].arguments)
    jsonschema.validate(arguments, WEATHER_PARAMETERS)
    assert calls[0].call_id
    raw = httpx.get(f"{tier.gateways[1]}/v1/responses/{answer.id}",
                    headers={"authorization": f"Bearer {key}"}, timeout=30)  # fmt: skip
    assert raw.status_code == 200
    validate("Response", raw.json())


def test_create_with_a_json_schema_format(tier: Tier) -> None:
    key = new_key(tier, "format-r")
    schema = {"type": "object", "properties": {"capital": {"type": "string"}},
              "required": ["capital"], "additionalProperties": False}  # fmt: skip
    answer = sdk(tier.gateways[0], key).responses.create(
        model="smollm2", input=QUESTION, temperature=0, max_output_tokens=40,
        text={"format": {"type": "json_schema", "name": "capital", "schema": schema,
                         "strict": True}},
        extra_headers={"x-weir-cache-control": "bypass"},
    )  # fmt: skip
    parsed = orjson.loads(answer.output_text)
    jsonschema.validate(parsed, schema)
    assert answer.text is not None
    assert answer.text.format is not None
    assert answer.text.format.type == "json_schema"
