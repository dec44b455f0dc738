"""The Responses API through the gateway, in-process, over a fake engine: translation to
chat, the typed stream events, the stored chain, tenants, bounds and the error table.

Every response body, item list and stream event is validated against OpenAI's spec.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from pydantic import SecretStr
from starlette.testclient import TestClient

from models.engines.client import EngineStream
from models.engines.fleet import Fleet, Replica
from models.types import ReplicaKey
from serving.http.app import create_app
from serving.settings import GatewayConfig, ResponsesConfig, Settings
from tests.fakes.engine import FakeEngine
from tests.openai_spec import validate, validate_response_event
from tests.redis_server import dead_port

JSON = dict[str, Any]
KEYS = ["sk-alice", "sk-bob"]
ALICE = {"authorization": "Bearer sk-alice"}
BOB = {"authorization": "Bearer sk-bob"}
CALL: JSON = {"id": "call_1", "type": "function", "function": {"name": "get_weather"}}
ARGUMENTS = ['{"city": ', '"Paris"}']


@dataclass
class ToolEngine(FakeEngine):
    """The fake engine, plus what vLLM sends for a tool call when the request has tools
    (and ``tool_choice`` is not ``none``), and ``finish_reason`` as told."""

    finish: str = "stop"

    def _calls_tool(self, body: JSON) -> bool:
        return bool(body.get("tools")) and body.get("tool_choice") != "none"

    async def complete(self, path: str, body: JSON) -> JSON:
        answer = await super().complete(path, body)
        choice = answer["choices"][0]
        choice["finish_reason"] = self.finish
        if self._calls_tool(body):
            function = CALL["function"] | {"arguments": "".join(ARGUMENTS)}
            choice["message"] |= {"content": None, "tool_calls": [CALL | {"function": function}]}
            choice["finish_reason"] = "tool_calls"
        return answer

    async def open_stream(self, path: str, body: JSON) -> EngineStream:
        inner = await super().open_stream(path, body)
        return _Rewritten(inner, self, self._calls_tool(body))


class _Rewritten:
    def __init__(self, inner: EngineStream, engine: ToolEngine, tool: bool) -> None:
        self.inner, self.engine, self.tool = inner, engine, tool

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        async for raw in self.inner:
            if raw == b"[DONE]":
                yield raw
                continue
            chunk = orjson.loads(raw)
            for choice in chunk["choices"]:
                if choice.get("finish_reason"):
                    choice["finish_reason"] = self.engine.finish
                if self.tool and choice["delta"].get("content"):
                    for delta in _tool_deltas(choice):
                        yield orjson.dumps(chunk | {"choices": [delta]})
                    break
            else:
                yield orjson.dumps(chunk)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _tool_deltas(choice: JSON) -> list[JSON]:
    """A tool call as vLLM streams it: id and name first, then the arguments in pieces
    (sent in place of the first content delta; later content deltas are dropped)."""
    if choice["delta"]["content"] != "Hello":
        return []
    first = {"index": 0, **CALL, "function": {"name": "get_weather", "arguments": ""}}
    deltas = [{"index": 0, "delta": {"tool_calls": [first]}, "finish_reason": None}]
    for piece in ARGUMENTS:
        call = {"index": 0, "function": {"arguments": piece}}
        deltas.append({"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": None})
    deltas.append({"index": 0, "delta": {}, "finish_reason": "tool_calls"})
    return deltas


def make_client(engine: FakeEngine, tmp_path: Path, **responses: Any) -> TestClient:
    settings = Settings(
        gateway=GatewayConfig(api_keys=[SecretStr(k) for k in KEYS]),
        responses=ResponsesConfig(sqlite_path=tmp_path / "responses.sqlite3", **responses),
    )

    def fleet(_: object) -> Fleet:
        replica = Replica(ReplicaKey("smollm2", "135m-instruct", 0), engine, "smollm2")
        return Fleet([replica], health_interval_s=0.05)

    return TestClient(create_app(settings, fleet_factory=fleet, counters={}),
                      raise_server_exceptions=False)  # fmt: skip


@pytest.fixture
def engine() -> ToolEngine:
    return ToolEngine()


@pytest.fixture
def client(engine: ToolEngine, tmp_path: Path) -> Iterator[TestClient]:
    with make_client(engine, tmp_path) as c:
        yield c


def create(client: TestClient, headers: dict[str, str] = ALICE, **body: Any) -> Any:
    return client.post("/v1/responses", json={"model": "smollm2", **body}, headers=headers)


def events_of(text: str) -> list[JSON]:
    """The stream's events; each SSE ``event:`` line names its data's ``type``."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        kind, data = block.split("\n", 1)
        event = orjson.loads(data.removeprefix("data: "))
        assert kind == f"event: {event['type']}"
        events.append(event)
    return events


def stream(client: TestClient, headers: dict[str, str] = ALICE, **body: Any) -> list[JSON]:
    asked = {"model": "smollm2", "stream": True, **body}
    with client.stream("POST", "/v1/responses", json=asked, headers=headers) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        events = events_of(response.read().decode())
    for n, event in enumerate(events):
        validate_response_event(event)
        assert event["sequence_number"] == n
    return events


def test_text_input_is_a_chat_completion(client: TestClient, engine: ToolEngine) -> None:
    answer = create(client, input="Hi", instructions="Be brief.", max_output_tokens=20,
                    temperature=0.5, top_p=0.9, metadata={"k": "v"})  # fmt: skip
    assert answer.status_code == 200, answer.text
    body = answer.json()
    validate("Response", body)
    assert body["id"].startswith("resp_")
    assert body["status"] == "completed"
    assert body["output"][0]["content"][0]["text"] == "Hello there!"
    assert body["usage"]["input_tokens"] == 5
    assert body["usage"]["output_tokens"] == 3
    assert body["usage"]["total_tokens"] == 8
    assert (body["instructions"], body["max_output_tokens"]) == ("Be brief.", 20)
    assert (body["temperature"], body["top_p"], body["metadata"]) == (0.5, 0.9, {"k": "v"})
    assert answer.headers["x-weir-model-version"] == "135m-instruct"
    sent = engine.calls[-1]
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    assert (sent["max_tokens"], sent["temperature"], sent["top_p"]) == (20, 0.5, 0.9)


def test_message_items_become_chat_messages(client: TestClient, engine: ToolEngine) -> None:
    items = [
        {"role": "developer", "content": "Answer in French."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Salut"}]},
        {"role": "user", "content": "Again"},
    ]
    answer = create(client, input=items)
    validate("Response", answer.json())
    assert engine.calls[-1]["messages"] == [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Salut"},
        {"role": "user", "content": "Again"},
    ]


def test_stream_events_in_order_and_the_stored_response_is_the_last(
    client: TestClient,
) -> None:
    events = stream(client, input="Hi")
    kinds = [e["type"] for e in events]
    assert kinds == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed",
    ]  # fmt: skip
    assert events[0]["response"]["status"] == "in_progress"
    assert "".join(e["delta"] for e in events if "delta" in e) == "Hello there!"
    final = events[-1]["response"]
    assert final["output"][0]["content"][0]["text"] == "Hello there!"
    assert final["output"][0]["id"] == events[2]["item"]["id"]
    assert final["usage"]["total_tokens"] == 8
    stored = client.get(f"/v1/responses/{final['id']}", headers=ALICE)
    assert stored.status_code == 200
    validate("Response", stored.json())
    assert stored.json() == final


def test_previous_response_id_continues_the_conversation(
    client: TestClient, engine: ToolEngine
) -> None:
    first = create(client, input="My name is Ada.", instructions="Be kind.").json()
    second = create(client, input="What is my name?", previous_response_id=first["id"]).json()
    validate("Response", second)
    assert second["previous_response_id"] == first["id"]
    assert engine.calls[-1]["messages"] == [  # instructions are not carried over
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Hello there!"},
        {"role": "user", "content": "What is my name?"},
    ]
    stream(client, input="And again?", previous_response_id=second["id"])
    assert len(engine.calls[-1]["messages"]) == 5


def test_store_false_is_not_retrievable(client: TestClient) -> None:
    body = create(client, input="Hi", store=False).json()
    assert body["store"] is False
    assert client.get(f"/v1/responses/{body['id']}", headers=ALICE).status_code == 404
    again = create(client, input="Hi", previous_response_id=body["id"])
    assert again.status_code == 404
    assert again.json()["error"]["code"] == "response_not_found"
    streamed = stream(client, input="Hi", store=False)[-1]["response"]
    assert client.get(f"/v1/responses/{streamed['id']}", headers=ALICE).status_code == 404


def test_another_key_sees_a_404(client: TestClient) -> None:
    body = create(client, input="Hi").json()
    path = f"/v1/responses/{body['id']}"
    for answer in (
        client.get(path, headers=BOB),
        client.get(path + "/input_items", headers=BOB),
        client.delete(path, headers=BOB),
        create(client, BOB, input="Hi", previous_response_id=body["id"]),
    ):
        assert answer.status_code == 404
        validate("ErrorResponse", answer.json())
        assert answer.json()["error"]["code"] == "response_not_found"
    assert client.get(path, headers=ALICE).status_code == 200  # Bob's delete did nothing


def test_delete_then_gone(client: TestClient) -> None:
    body = create(client, input="Hi").json()
    path = f"/v1/responses/{body['id']}"
    deleted = client.delete(path, headers=ALICE)
    assert deleted.status_code == 200
    assert deleted.json() == {"id": body["id"], "object": "response", "deleted": True}
    assert client.get(path, headers=ALICE).status_code == 404
    assert client.delete(path, headers=ALICE).status_code == 404


def test_input_items_list_pages(client: TestClient) -> None:
    items = [{"role": "user", "content": f"m{n}"} for n in range(5)]
    body = create(client, input=items).json()
    path = f"/v1/responses/{body['id']}/input_items"
    newest = client.get(path, headers=ALICE).json()
    validate("ResponseItemList", newest)
    assert [i["content"][0]["text"] for i in newest["data"]] == ["m4", "m3", "m2", "m1", "m0"]
    page = client.get(path, params={"order": "asc", "limit": 2}, headers=ALICE).json()
    validate("ResponseItemList", page)
    assert [i["content"][0]["text"] for i in page["data"]] == ["m0", "m1"]
    assert page["has_more"] is True
    rest = client.get(path, params={"order": "asc", "after": page["last_id"]}, headers=ALICE)
    assert [i["content"][0]["text"] for i in rest.json()["data"]] == ["m2", "m3", "m4"]
    assert rest.json()["has_more"] is False
    bad = client.get(path, params={"limit": 500}, headers=ALICE)
    assert bad.status_code == 400


def test_function_tools_and_calls_round_trip(client: TestClient, engine: ToolEngine) -> None:
    tool = {
        "type": "function",
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
    body = create(client, input="Weather in Paris?", tools=[tool],
                  tool_choice={"type": "function", "name": "get_weather"}).json()  # fmt: skip
    validate("Response", body)
    sent = engine.calls[-1]
    assert sent["tools"] == [{"type": "function", "function": {k: v for k, v in tool.items()
                                                               if k != "type"}}]  # fmt: skip
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    [call] = body["output"]
    assert call["type"] == "function_call"
    assert (call["call_id"], call["name"]) == ("call_1", "get_weather")
    assert orjson.loads(call["arguments"]) == {"city": "Paris"}
    result = {"type": "function_call_output", "call_id": "call_1", "output": "18C, sunny"}
    follow = create(client, input=[result], previous_response_id=body["id"], tools=[tool],
                    tool_choice="none")  # fmt: skip
    validate("Response", follow.json())
    assert engine.calls[-1]["messages"][1:] == [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"},
    ]  # fmt: skip
    listed = client.get(f"/v1/responses/{follow.json()['id']}/input_items", headers=ALICE)
    validate("ResponseItemList", listed.json())


def test_streamed_function_call_events(client: TestClient) -> None:
    tool = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}
    events = stream(client, input="Weather?", tools=[tool], tool_choice="required")
    kinds = [e["type"] for e in events]
    assert kinds == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.function_call_arguments.delta", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed",
    ]  # fmt: skip
    done = events[-3]
    assert (done["name"], done["arguments"]) == ("get_weather", '{"city": "Paris"}')
    assert events[-1]["response"]["output"][0]["arguments"] == '{"city": "Paris"}'


def test_text_format_json_schema_is_response_format(client: TestClient, engine: ToolEngine) -> None:
    engine.content = '{"answer": 4}'
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}},
              "required": ["answer"], "additionalProperties": False}  # fmt: skip
    fmt = {"type": "json_schema", "name": "sum", "schema": schema, "strict": True}
    body = create(client, input="2+2?", text={"format": fmt}).json()
    validate("Response", body)
    assert body["text"] == {"format": fmt}
    assert engine.calls[-1]["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "sum", "schema": schema, "strict": True}
    }  # fmt: skip


def test_token_limit_makes_it_incomplete(tmp_path: Path) -> None:
    with make_client(ToolEngine(finish="length"), tmp_path) as client:
        body = create(client, input="Hi", max_output_tokens=3).json()
        validate("Response", body)
        assert body["status"] == "incomplete"
        assert body["incomplete_details"] == {"reason": "max_output_tokens"}
        events = stream(client, input="Hi", max_output_tokens=3)
        assert events[-1]["type"] == "response.incomplete"
        assert events[-1]["response"]["output"][0]["status"] == "incomplete"


def test_engine_dying_mid_stream_fails_the_response(tmp_path: Path) -> None:
    with make_client(ToolEngine(die_after=1), tmp_path) as client:
        events = stream(client, input="Hi")
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    assert events[-2]["code"] == "engine_error"
    failed = events[-1]["response"]
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "server_error"
    with make_client(ToolEngine(), tmp_path) as client:  # never stored
        assert client.get(f"/v1/responses/{failed['id']}", headers=ALICE).status_code == 404


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": [{"type": "web_search_call", "id": "x"}]}, "input[0]"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
         "input[0].content[0]"),
        ({"input": "Hi", "tools": [{"type": "web_search"}]}, "tools[0]"),
        ({"input": "Hi", "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
        ({"input": "Hi", "tool_choice": "required"}, "tool_choice"),
        ({"input": "Hi", "background": True}, "background"),
        ({"input": "Hi", "conversation": "conv_1"}, "conversation"),
        ({"input": "Hi", "truncation": "auto"}, "truncation"),
        ({"input": "Hi", "temperature": 3}, "temperature"),
        ({"input": []}, "input"),
        ({"input": "Hi", "max_output_tokens": 10**9}, "max_output_tokens"),
    ],
)  # fmt: skip
def test_what_we_cannot_serve_is_a_clear_400(client: TestClient, body: JSON, param: str) -> None:
    answer = create(client, **body)
    assert answer.status_code == 400, answer.text
    validate("ErrorResponse", answer.json())
    assert answer.json()["error"]["param"] == param


def test_bounds_on_input_and_chain(tmp_path: Path) -> None:
    with make_client(ToolEngine(), tmp_path, max_input_items=3, max_chain_items=6,
                     max_chain_bytes=2048) as client:  # fmt: skip
        items = [{"role": "user", "content": "x"}] * 4
        too_many = create(client, input=items)
        assert too_many.status_code == 400
        assert "responses.max_input_items" in too_many.json()["error"]["message"]
        first = create(client, input=items[:3]).json()  # 3 in, 1 out
        long = create(client, input=items[:3], previous_response_id=first["id"])
        assert long.status_code == 400  # 4 + 3 items > 6
        assert long.json()["error"]["param"] == "previous_response_id"
        assert "responses.max_chain_items" in long.json()["error"]["message"]
        big = create(client, input="y" * 1500, previous_response_id=first["id"])
        assert big.status_code == 400
        assert "responses.max_chain_bytes" in big.json()["error"]["message"]


def test_the_chat_contract_names_the_responses_field(client: TestClient) -> None:
    answer = create(client, input="Hi", max_output_tokens=100_000)  # over contract.max_tokens
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "max_output_tokens"


def test_methods_and_stream_retrieval_are_refused(client: TestClient) -> None:
    listed = client.get("/v1/responses", headers=ALICE)
    assert (listed.status_code, listed.headers["allow"]) == (405, "POST")
    put = client.put("/v1/responses/resp_1", headers=ALICE)
    assert (put.status_code, put.headers["allow"]) == (405, "GET, DELETE")
    items = client.post("/v1/responses/resp_1/input_items", headers=ALICE)
    assert (items.status_code, items.headers["allow"]) == (405, "GET")
    body = create(client, input="Hi").json()
    answer = client.get(f"/v1/responses/{body['id']}?stream=true", headers=ALICE)
    assert answer.status_code == 400
    assert client.get("/v1/responses/resp_1", headers={}).status_code == 401


def test_openapi_lists_the_routes(client: TestClient) -> None:
    document = client.get("/openapi.json", headers=ALICE).json()
    paths = document["paths"]
    assert set(paths["/v1/responses"]) == {"post"}
    assert set(paths["/v1/responses/{response_id}"]) == {"get", "delete"}
    assert set(paths["/v1/responses/{response_id}/input_items"]) == {"get"}
    create = paths["/v1/responses"]["post"]
    body = create["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ResponseRequest"}
    assert "429" in create["responses"]
    assert "404" in paths["/v1/responses/{response_id}"]["get"]["responses"]
    listed = paths["/v1/responses/{response_id}/input_items"]["get"]["parameters"]
    assert {p["name"] for p in listed} == {"response_id", "limit", "order", "after"}


def test_the_openai_client(client: TestClient) -> None:
    sdk = openai.OpenAI(base_url=f"{client.base_url}/v1", api_key="sk-alice",
                        http_client=client, max_retries=0)  # fmt: skip
    first = sdk.responses.create(model="smollm2", input="Hi", instructions="Be brief.")
    assert first.output_text == "Hello there!"
    assert sdk.responses.retrieve(first.id).output_text == "Hello there!"
    items = sdk.responses.input_items.list(first.id)
    assert [i.type for i in items.data] == ["message"]
    with sdk.responses.stream(model="smollm2", input="Again",
                              previous_response_id=first.id) as events:  # fmt: skip
        deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
        final = events.get_final_response()
    assert "".join(deltas) == final.output_text == "Hello there!"
    raw = list(sdk.responses.create(model="smollm2", input="Hi", stream=True))
    assert raw[-1].type == "response.completed"
    sdk.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(first.id)


def test_two_gateways_sharing_redis_continue_each_others_responses(
    tmp_path: Path, redis_url: str
) -> None:
    one, two = ToolEngine(), ToolEngine()
    with (
        make_client(one, tmp_path / "a", redis_url=redis_url) as a,
        make_client(two, tmp_path / "b", redis_url=redis_url) as b,
    ):
        first = create(a, input="My name is Ada.").json()
        assert b.get(f"/v1/responses/{first['id']}", headers=ALICE).json() == first
        second = stream(b, input="Name?", previous_response_id=first["id"])[-1]["response"]
        assert len(two.calls[-1]["messages"]) == 3
        third = create(a, input="Again?", previous_response_id=second["id"])
        assert third.status_code == 200
        assert len(one.calls[-1]["messages"]) == 5
        assert b.get(f"/v1/responses/{first['id']}", headers=BOB).status_code == 404
    assert not (tmp_path / "a" / "responses.sqlite3").exists()  # Redis, not the file


def test_store_down_is_a_503_or_a_failed_stream(tmp_path: Path) -> None:
    with dead_port() as port:  # nothing listens there, nor can while the test runs
        down = f"redis://127.0.0.1:{port}/0"
        with make_client(ToolEngine(), tmp_path, redis_url=down, timeout_s=0.2) as client:
            for answer in (
                create(client, input="Hi"),
                create(client, input="Hi", previous_response_id="resp_1"),
                client.get("/v1/responses/resp_1", headers=ALICE),
            ):
                assert answer.status_code == 503
                validate("ErrorResponse", answer.json())
                assert answer.json()["error"]["code"] == "responses_unavailable"
            events = stream(client, input="Hi")
            assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
            assert events[-2]["code"] == "responses_unavailable"
            assert create(client, input="Hi", store=False).status_code == 200  # needs no store


def test_version_pin_and_cache_control_headers_apply(client: TestClient) -> None:
    pinned = {**ALICE, "x-weir-model-version": "135m-instruct", "x-weir-cache-control": "bypass"}
    answer = create(client, pinned, input="Hi", temperature=0)
    assert answer.status_code == 200
    assert answer.headers["x-weir-model-version"] == "135m-instruct"
    assert answer.headers["x-weir-cache"] == "bypass"
    missing = create(client, {**ALICE, "x-weir-model-version": "v9"}, input="Hi")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"
