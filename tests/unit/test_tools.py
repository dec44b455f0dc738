"""Tool calling: the request's tools and tool choice, the version's tool support and engine
flags, strict arguments, and tool answers in the cache (stored, replayed, reassembled)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from models.config import StoreConfig
from models.store import ModelStore
from models.tokenizer import TokenCounter
from models.tool_calling import CHATML_TOOLS, derive, model_template, tool_support
from models.types import VersionKey
from serving.cache.entries import Assembler, replay, replayable
from serving.core import tools
from serving.errors import InvalidModelOutput, InvalidRequest
from serving.protocol.requests import ChatCompletionRequest
from tests.fakes.engine import FakeEngine
from tests.openai_spec import validate
from tests.unit.test_gateway import make_client

JSON = dict[str, Any]
WEATHER: JSON = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
STRICT: JSON = {"type": "function", "function": {**WEATHER["function"], "strict": True}}
ASK: JSON = {"model": "smollm2", "messages": [{"role": "user", "content": "Weather in Paris?"}]}


def smollm2_dir() -> Path:
    return ModelStore(StoreConfig().root).resolve("smollm2-135m-instruct")


def request(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(ASK | fields)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]},
         "tools[0].function.name"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}]},
         "tools[0].function.parameters"),
        ({"tools": [WEATHER, WEATHER]}, "tools[1]"),
        ({"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]},
         "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
         "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function"}}, "tool_choice"),
        ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        ({"messages": [{"role": "tool", "content": "18 C"}]}, "messages[0].tool_call_id"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "$ref": "http://127.0.0.1:1/x"}}}]}, "tools[0].function.parameters"),
    ],
)  # fmt: skip
def test_tools_openai_refuses_are_refused_with_their_param(fields: JSON, param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        tools.check_tools(request(**fields))
    assert caught.value.param == param


def test_valid_tool_requests_pass() -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in (None, "none", "auto", "required", named):
        tools.check_tools(request(tools=[WEATHER], tool_choice=choice, parallel_tool_calls=False))
    tools.check_tools(request(tool_choice="none"))  # none without tools: harmless


def test_tools_are_rendered_as_vllm_dumps_them() -> None:
    bare = {"type": "function", "function": {"name": "f", "extra": 1}, "x": 2}
    assert tools.rendered([bare, STRICT]) == [
        {"type": "function",
         "function": {"name": "f", "description": None, "parameters": None}},
        {"type": "function", "function": {**STRICT["function"]}},
    ]  # fmt: skip


def test_the_smollm2_template_gets_weirs_chatml_tools_template_and_hermes() -> None:
    own = model_template(smollm2_dir())
    support = derive(own)
    assert (support.calls_tools, support.parser, support.template) == (
        True,
        "hermes",
        CHATML_TOOLS,
    )
    assert support.engine_args() == [
        "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
        "--tool-strict-level", "parameter", "--chat-template", str(CHATML_TOOLS),
    ]  # fmt: skip
    assert derive("{{ '<tool_call>' }}").template is None  # the model's own renders tools
    assert derive("{{ messages }}").calls_tools is False
    assert derive(None).engine_args() == []
    off = tool_support("chat", "off", None, "parameter", smollm2_dir())
    assert not off.calls_tools
    assert off.engine_args() == []
    remote = tool_support("chat", "auto", None, "parameter", None)
    assert remote.calls_tools
    assert remote.engine_args() == []
    assert not tool_support("embed", "auto", None, "parameter", smollm2_dir()).calls_tools


def test_weirs_template_renders_conversations_without_tools_as_the_models_own() -> None:
    own = TokenCounter.from_dir(smollm2_dir())
    ours = TokenCounter.from_dir(smollm2_dir(), chat_template=CHATML_TOOLS)
    for messages in (
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "x"}],
    ):  # fmt: skip
        assert ours.render_chat(messages) == own.render_chat(messages)
    with_tools = ours.render_chat(ASK["messages"], tools.rendered([WEATHER]))
    assert "<tools>" in with_tools
    assert '"name": "get_weather"' in with_tools


def answer_with_call(arguments: str) -> JSON:
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": arguments}}  # fmt: skip
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "smollm2",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "refusal": None,
                    "tool_calls": [call],
                },
                "logprobs": None,
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    }


def test_strict_arguments_are_held_to_their_parameters() -> None:
    strict = tools.strict_schemas({"tools": [STRICT]})
    tools.check_tool_calls(answer_with_call('{"city": "Paris"}'), strict)
    with pytest.raises(InvalidModelOutput, match=r"get_weather.*\(root\)"):
        tools.check_tool_calls(answer_with_call('{"town": "Paris"}'), strict)
    with pytest.raises(InvalidModelOutput, match="not JSON"):
        tools.check_tool_calls(answer_with_call('{"city": '), strict)
    assert tools.strict_schemas({"tools": [WEATHER]}) == {}  # not strict: not checked


class ToolEngine(FakeEngine):
    """Answers every chat with one call to get_weather with ``arguments``."""

    arguments: str = '{"city": "Paris"}'

    async def complete(self, path: str, body: JSON) -> JSON:
        self.calls.append(body)
        return answer_with_call(self.arguments)


@pytest.mark.parametrize(
    ("arguments", "policy", "status", "valid"),
    [
        ('{"city": "Paris"}', "reject", 200, "true"),
        ('{"town": "Paris"}', "reject", 502, None),
        ('{"town": "Paris"}', "pass", 200, "false"),
    ],
)
def test_a_strict_call_that_breaks_its_parameters_is_invalid_output(
    arguments: str, policy: str, status: int, valid: str | None
) -> None:
    from serving.settings import ContractConfig

    engine = ToolEngine()
    engine.arguments = arguments
    contract = ContractConfig.model_validate({"invalid_output": policy})
    with make_client(engine, contract=contract) as client:
        response = client.post("/v1/chat/completions", json=ASK | {"tools": [STRICT]})
    assert response.status_code == status, response.text
    assert response.headers.get("x-weir-output-valid") == valid
    if status == 200:
        validate("CreateChatCompletionResponse", response.json())
    else:
        assert response.json()["error"]["code"] == "invalid_model_output"


def test_a_version_that_calls_no_tools_refuses_them_before_the_engine() -> None:
    engine = FakeEngine()
    counter = TokenCounter.from_dir(smollm2_dir(), calls_tools=False)
    counters = {VersionKey("smollm2", "135m-instruct"): counter}
    with make_client(engine, counters=counters) as client:
        refused = client.post("/v1/chat/completions", json=ASK | {"tools": [WEATHER]})
        assert refused.status_code == 400
        assert refused.json()["error"]["param"] == "tools"
        assert engine.calls == []
        none = ASK | {"tools": [WEATHER], "tool_choice": "none"}
        assert client.post("/v1/chat/completions", json=none).status_code == 200


# A tool call as vLLM 0.32 streams it (hermes parser, recorded): named first, then the
# arguments in pieces, then finish_reason tool_calls.
STREAMED: list[JSON] = [
    {"delta": {"role": "assistant", "content": ""}},
    {"delta": {"tool_calls": [{"index": 0, "id": "chatcmpl-tool-1", "type": "function",
                               "function": {"name": "get_weather"}}]}},
    {"delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}},
    {"delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}},
    {"delta": {}, "finish_reason": "tool_calls"},
]  # fmt: skip


def test_a_streamed_tool_call_is_stored_and_replays_as_valid_chunks() -> None:
    assembler = Assembler(chat=True)
    for choice in STREAMED:
        head: JSON = {
            "id": "c1",
            "created": 1,
            "model": "smollm2",
            "object": "chat.completion.chunk",
        }
        assembler.add(head | {"choices": [{"index": 0, **choice}]})
    entry = assembler.entry()
    assert entry is not None
    assert replayable(entry)
    message = entry["choices"][0]["message"]
    assert message["content"] is None
    assert message["tool_calls"] == [
        {"id": "chatcmpl-tool-1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    ]  # fmt: skip
    assert entry["choices"][0]["finish_reason"] == "tool_calls"
    validate("CreateChatCompletionResponse", entry | {"usage": {"prompt_tokens": 1,
             "completion_tokens": 1, "total_tokens": 2}})  # fmt: skip
    chunks = replay(entry, include_usage=False)
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
    again = Assembler(chat=True)
    for chunk in chunks:
        again.add(chunk)
    assert again.entry() == entry
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
