"""Tool calling through the real stack and the official ``openai`` client: the stack's
chat version starts vLLM with the tool flags Weir derives from SmolLM2's template (its
ChatML template with Hermes tool calls, ``--tool-strict-level parameter``), so calls
parse and match their tool's parameters even from a 135M model."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import jsonschema
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from models.config import StoreConfig
from models.store import ModelStore
from models.tokenizer import TokenCounter
from models.tool_calling import derive, model_template
from serving.core import tools as tool_rules
from tests.integration.stack import Stack
from tests.openai_spec import validate

pytestmark = pytest.mark.integration
PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": PARAMETERS,
    },
}
TIME: ChatCompletionToolParam = {
    "type": "function",
    "function": {"name": "get_time", "description": "The local time in a city",
                 "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}  # fmt: skip
ASK: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the weather in Paris right now?"}
]
NO_CACHE = {"x-weir-cache-control": "bypass"}


def parsed_arguments(raw: str) -> dict[str, Any]:
    arguments = json.loads(raw)
    jsonschema.validate(arguments, PARAMETERS)
    return dict(arguments)


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_a_forced_call_returns_arguments_that_parse_and_validate(
    client: openai.OpenAI, choice: Any
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="smollm2", messages=ASK, tools=[WEATHER, TIME], tool_choice=choice,
        temperature=0, max_tokens=80, extra_headers=NO_CACHE,
    )  # fmt: skip
    validate("CreateChatCompletionResponse", orjson.loads(raw.content))
    answer = raw.parse()
    calls = answer.choices[0].message.tool_calls or []
    assert calls, answer
    weather = [c for c in calls if c.type == "function" and c.function.name == "get_weather"]
    assert weather, calls
    assert parsed_arguments(weather[0].function.arguments)["city"]
    assert answer.choices[0].finish_reason in ("tool_calls", "stop")  # named: OpenAI says stop


def test_auto_answers_validly_either_way(stack: Stack) -> None:
    body = {"model": "smollm2", "messages": ASK, "tools": [WEATHER], "tool_choice": "auto",
            "temperature": 0, "max_tokens": 60}  # fmt: skip
    response = httpx.post(f"{stack.base_url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    validate("CreateChatCompletionResponse", response.json())
    message = response.json()["choices"][0]["message"]
    assert message.get("content") or message.get("tool_calls")
    for call in message.get("tool_calls") or ():
        parsed_arguments(call["function"]["arguments"])


def test_a_streamed_call_reassembles_and_every_chunk_validates(stack: Stack) -> None:
    body = {"model": "smollm2", "messages": ASK, "tools": [WEATHER], "tool_choice": "required",
            "temperature": 0, "max_tokens": 80, "stream": True}  # fmt: skip
    calls: dict[int, dict[str, str]] = {}
    finish = None
    with httpx.stream(
        "POST", f"{stack.base_url}/v1/chat/completions", json=body, headers=NO_CACHE, timeout=120
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = orjson.loads(line[6:])
            validate("CreateChatCompletionStreamResponse", chunk)
            for choice in chunk["choices"]:
                finish = choice.get("finish_reason") or finish
                for delta in choice["delta"].get("tool_calls") or ():
                    into = calls.setdefault(delta["index"], {"name": "", "arguments": ""})
                    function = delta.get("function") or {}
                    into["name"] += function.get("name") or ""
                    into["arguments"] += function.get("arguments") or ""
    assert finish == "tool_calls"
    assert [c["name"] for c in calls.values()] == ["get_weather"]
    assert parsed_arguments(calls[0]["arguments"])["city"]


def test_a_conversation_with_a_tool_result_is_answered(client: openai.OpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"},
    ]  # fmt: skip
    raw = client.chat.completions.with_raw_response.create(
        model="smollm2", messages=messages, tools=[WEATHER], temperature=0, max_tokens=40,
        extra_headers=NO_CACHE,
    )  # fmt: skip
    validate("CreateChatCompletionResponse", orjson.loads(raw.content))
    message = raw.parse().choices[0].message
    assert message.content or message.tool_calls


def test_prompts_with_tools_are_counted_as_the_engine_counts_them(client: openai.OpenAI) -> None:
    directory = ModelStore(StoreConfig().root).resolve("smollm2-135m-instruct")
    support = derive(model_template(directory))
    counter = TokenCounter.from_dir(directory, chat_template=support.template)
    conversation: list[ChatCompletionMessageParam] = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_time", "arguments": '{"city":   "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "It is 14:05 in Paris, ça va."},
    ]  # fmt: skip
    for messages, tools in ((ASK, [WEATHER]), (ASK, [WEATHER, TIME]), (conversation, [TIME])):
        answer = client.chat.completions.create(
            model="smollm2", messages=messages, tools=tools, temperature=0, max_tokens=1,
            extra_headers=NO_CACHE,
        )  # fmt: skip
        assert answer.usage is not None
        counted = counter.count_chat(
            [dict(m) for m in messages], tool_rules.rendered([dict(t) for t in tools])
        )
        assert counted == answer.usage.prompt_tokens


def until_hit(url: str, body: dict[str, Any]) -> httpx.Response:
    """The answer is stored in the background after it is sent (in this stack's process,
    or its Redis under workers): ask again until the cache has it, for at most 10 s."""
    deadline = time.monotonic() + 10
    while True:
        time.sleep(0.05)
        again = httpx.post(url, json=body, timeout=120)
        if again.headers.get("x-weir-cache") == "hit" or time.monotonic() > deadline:
            return again


def test_a_deterministic_tool_answer_is_cached_and_replays_as_a_stream(stack: Stack) -> None:
    body = {"model": "smollm2", "messages": ASK, "tools": [WEATHER], "tool_choice": "required",
            "temperature": 0, "max_tokens": 80, "user": "tools-cache"}  # fmt: skip
    url = f"{stack.base_url}/v1/chat/completions"
    first = httpx.post(url, json=body, headers={"x-weir-cache-control": "refresh"}, timeout=120)
    assert first.status_code == 200
    calls = first.json()["choices"][0]["message"]["tool_calls"]
    again = until_hit(url, body)
    assert again.headers["x-weir-cache"] == "hit"
    assert again.json()["choices"][0]["message"]["tool_calls"] == calls
    with httpx.stream("POST", url, json=body | {"stream": True}, timeout=120) as streamed:
        assert streamed.headers["x-weir-cache"] == "hit"
        chunks = [orjson.loads(line[6:]) for line in streamed.iter_lines()
                  if line.startswith("data: {")]  # fmt: skip
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
    deltas = [d for c in chunks for d in c["choices"][0]["delta"].get("tool_calls") or ()]
    assert [d["function"]["arguments"] for d in deltas] == [
        c["function"]["arguments"] for c in calls
    ]
