"""The gateway in-process with a fake engine: the contract, headers and errors."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from pydantic import SecretStr
from starlette.testclient import TestClient

from models.config import StoreConfig
from models.engines.fleet import Fleet, Replica
from models.store import ModelStore
from models.tokenizer import TokenCounter
from models.types import ReplicaKey, VersionKey
from serving.http.app import create_app
from serving.settings import ContractConfig, GatewayConfig, Settings
from tests.fakes.engine import FakeEngine
from tests.openai_spec import validate

CHAT: dict[str, Any] = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}
# an image the engine would fetch from the cloud metadata address: refused before it
METADATA_IMAGE = {"type": "image_url", "image_url": {"url": "http://169.254.169.254/"}}


def make_client(
    chat: FakeEngine,
    embed: FakeEngine | None = None,
    *,
    counters: dict[VersionKey, TokenCounter] | None = None,
    contract: ContractConfig | None = None,
    **gateway: Any,
) -> TestClient:
    settings = Settings(gateway=GatewayConfig(**gateway), contract=contract or ContractConfig())
    embed = embed or FakeEngine(name="embed")

    def fleet(_: object) -> Fleet:
        return Fleet(
            [
                Replica(ReplicaKey("smollm2", "135m-instruct", 0), chat, "smollm2"),
                Replica(ReplicaKey("minilm", "l6-v2", 0), embed, "minilm"),
            ],
            health_interval_s=0.05,
        )

    app = create_app(settings, fleet_factory=fleet, counters=counters or {})
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(engine: FakeEngine) -> Iterator[TestClient]:
    with make_client(engine) as c:
        yield c


def sse(text: str) -> list[Any]:
    events = [line[6:] for line in text.split("\n\n") if line.startswith("data: ")]
    return [e if e == "[DONE]" else orjson.loads(e) for e in events]


def test_chat_is_cleaned_to_the_spec_and_labelled(client: TestClient, engine: FakeEngine) -> None:
    response = client.post("/v1/chat/completions", json=CHAT, headers={"x-request-id": "abc-1"})
    assert response.status_code == 200
    body = response.json()
    validate("CreateChatCompletionResponse", body)
    assert body["model"] == "smollm2"
    assert body["system_fingerprint"] == "weir-smollm2@135m-instruct"
    assert "service_tier" not in body
    assert "kv_transfer_params" not in body
    assert response.headers["x-request-id"] == "abc-1"
    assert response.headers["x-weir-model-version"] == "135m-instruct"
    assert engine.calls[-1]["model"] == "smollm2"


def test_pinned_version_is_served(client: TestClient) -> None:
    response = client.post("/v1/chat/completions", json=CHAT | {"model": "smollm2@135m-instruct"})
    assert response.status_code == 200
    assert response.json()["model"] == "smollm2@135m-instruct"


def test_completion_and_embeddings_validate(client: TestClient) -> None:
    completion = client.post("/v1/completions", json={"model": "smollm2", "prompt": "Hi"})
    validate("CreateCompletionResponse", completion.json())
    embeddings = client.post("/v1/embeddings", json={"model": "minilm", "input": ["a", "b"]})
    validate("CreateEmbeddingResponse", embeddings.json())
    assert len(embeddings.json()["data"]) == 2


def test_stream_chunks_validate_and_end_with_done(client: TestClient) -> None:
    body = CHAT | {"stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse(response.read().decode())
    assert events[-1] == "[DONE]"
    for chunk in events[:-1]:
        validate("CreateChatCompletionStreamResponse", chunk)
    assert any(c["choices"] and c["choices"][0]["finish_reason"] for c in events[:-1])
    assert events[-2]["usage"]["total_tokens"] == 8


VLLM_ONLY = {"prompt_token_ids", "token_ids", "stop_reason", "prompt_logprobs"}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"model": "smollm2", "prompt": "Hi", "echo": True, "stop": "."}),
        ("/v1/completions", {"model": "smollm2", "prompt": "Hi", "return_token_ids": True}),
        ("/v1/chat/completions", CHAT | {"return_token_ids": True, "stop": ["."]}),
    ],
)
def test_vllm_extras_are_cleaned_out(client: TestClient, path: str, body: dict[str, Any]) -> None:
    """vLLM's own fields with values (prompt_token_ids of an echo, token_ids, stop_reason)
    are not OpenAI's: gone from answers and from every stream chunk."""
    answer = client.post(path, json=body).json()
    with client.stream("POST", path, json=body | {"stream": True}) as response:
        chunks = sse(response.read().decode())[:-1]
    for each in [answer, *chunks]:
        assert not VLLM_ONLY & each.keys()
        for choice in each["choices"]:
            assert not VLLM_ONLY & choice.keys()
    if body.get("echo"):
        assert answer["choices"][0]["text"].startswith("Hi")
        assert chunks[0]["choices"][0]["text"] == "Hi"


def test_chat_logprobs_carry_refusal_as_the_spec_requires(client: TestClient) -> None:
    """vLLM's chat ``logprobs`` has ``content`` only; the spec requires ``refusal`` too
    (null), in an answer and in every stream chunk, as OpenAI sends it."""
    body = CHAT | {"logprobs": True, "top_logprobs": 0}
    answer = client.post("/v1/chat/completions", json=body).json()
    validate("CreateChatCompletionResponse", answer)
    assert answer["choices"][0]["logprobs"]["refusal"] is None
    assert answer["choices"][0]["logprobs"]["content"][0]["token"] == "Hello"
    with client.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as response:
        chunks = sse(response.read().decode())[:-1]
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
    assert [c["choices"][0]["logprobs"]["refusal"] for c in chunks[1:]] == [None] * 3


def test_engine_dying_mid_stream_tells_the_client() -> None:
    with (
        make_client(FakeEngine(die_after=1)) as client,
        client.stream("POST", "/v1/chat/completions", json=CHAT | {"stream": True}) as response,
    ):
        events = sse(response.read().decode())
    assert events[-1] == "[DONE]"
    validate("ErrorResponse", events[-2])
    assert events[-2]["error"]["code"] == "engine_error"


def test_models_lists_aliases_and_versions(client: TestClient) -> None:
    body = client.get("/v1/models").json()
    validate("ListModelsResponse", body)
    assert {m["id"] for m in body["data"]} == {
        "smollm2",
        "smollm2@135m-instruct",
        "minilm",
        "minilm@l6-v2",
    }


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["versions"] == {"smollm2@135m-instruct": True, "minilm@l6-v2": True}


def test_readiness_fails_when_an_engine_is_down() -> None:
    with make_client(FakeEngine(healthy=False)) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["versions"]["smollm2@135m-instruct"] is False
        response = client.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "engine_unavailable"
        assert "retry-after" in response.headers


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        (CHAT | {"model": "nope"}, 404, "model_not_found", "model"),
        ({"model": "smollm2"}, 400, "invalid_request", "messages"),
        (CHAT | {"messages": []}, 400, "invalid_request", "messages"),
        (
            CHAT | {"messages": [{"role": "wizard", "content": "x"}]},
            400,
            "invalid_request",
            "messages[0].role",
        ),
        (
            CHAT | {"messages": [{"role": "user", "content": None}]},
            400,
            "invalid_request",
            "messages[0].content",
        ),
        (CHAT | {"messages": [{"role": "system"}]}, 400, "invalid_request", "messages[0].content"),
        (
            CHAT | {"messages": [{"role": "user", "content": [METADATA_IMAGE]}]},
            400,
            "invalid_request",
            "messages[0].content[0].image_url.url",
        ),
        (CHAT | {"temperature": 9}, 400, "invalid_request", "temperature"),
        (CHAT | {"n": 1000}, 400, "invalid_request", "n"),
        (CHAT | {"max_tokens": 0}, 400, "invalid_request", "max_tokens"),
        ({"model": "minilm", "messages": CHAT["messages"]}, 400, "model_not_supported", "model"),
        ([1, 2, 3], 400, "invalid_request", None),
    ],
)
def test_bad_input_gets_an_openai_error(
    client: TestClient, body: Any, status: int, code: str, param: str | None
) -> None:
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == status
    validate("ErrorResponse", response.json())
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize("n", [9, 17, 10**30])
def test_n_over_the_configured_bound_names_that_bound(n: int) -> None:
    """contract.max_n (8 here) is the bound applied: every n above it, within the old wire
    cap of 16 or past it, gets a 400 naming 8 and the setting, not a cap it never saw."""
    with make_client(FakeEngine(), contract=ContractConfig(max_n=8)) as client:
        for path, body in (
            ("/v1/chat/completions", CHAT | {"n": n, "temperature": 1}),
            ("/v1/completions", {"model": "smollm2", "prompt": "Hi", "n": n, "temperature": 1}),
        ):
            error = client.post(path, json=body).json()["error"]
            assert error["param"] == "n"
            assert "at most 8" in error["message"]
            assert "contract.max_n" in error["message"]
            assert "16" not in error["message"]


def test_body_that_is_not_json(client: TestClient) -> None:
    response = client.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "The request body is not valid JSON."


def test_body_too_large_is_413_before_parsing() -> None:
    with make_client(FakeEngine(), max_body_bytes=2048) as client:
        big = CHAT | {"messages": [{"role": "user", "content": "x" * 5000}]}
        response = client.post("/v1/chat/completions", json=big)
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "payload_too_large"

        def chunks() -> Iterator[bytes]:  # no content-length: counted while reading
            yield orjson.dumps(big)

        response = client.post("/v1/chat/completions", content=chunks())
        assert response.status_code == 413


def test_unknown_route_and_method(client: TestClient) -> None:
    assert client.get("/v1/nothing").json()["error"]["code"] == "not_found"
    response = client.get("/v1/chat/completions")
    assert response.status_code == 405
    validate("ErrorResponse", response.json())


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PUT", "/v1/batches", "GET, POST"),  # two routes, one per method: both named
        ("DELETE", "/v1/files", "GET, POST"),
        ("POST", "/v1/models", "GET"),
    ],
)
def test_a_405_says_which_methods_the_route_allows(
    client: TestClient, method: str, path: str, allow: str
) -> None:
    """HTTP requires an Allow header on 405; Starlette's named only the first route's."""
    response = client.request(method, path)
    assert response.status_code == 405
    assert response.headers["allow"] == allow
    validate("ErrorResponse", response.json())


def test_engine_rejection_keeps_its_param() -> None:
    from models.errors import EngineRejected

    failing = FakeEngine(
        fail_with=EngineRejected("max_tokens too big", status=400, param="max_tokens")
    )
    with make_client(failing) as client:
        response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "max_tokens"


def test_an_error_from_a_chosen_version_names_it() -> None:
    """The engine refused it (dimensions on a model that cannot do them): the version was
    chosen, so the error says which, as answers do; an unknown model's cannot."""
    from models.errors import EngineRejected

    refusing = FakeEngine(name="embed", fail_with=EngineRejected("no dimensions", status=400))
    chat = FakeEngine(fail_with=EngineRejected("too long", status=400))
    with make_client(chat, refusing) as client:
        embedded = client.post("/v1/embeddings", json=EMBED | {"dimensions": 8})
        streamed = client.post("/v1/chat/completions", json=CHAT | {"stream": True})
        unknown = client.post("/v1/chat/completions", json=CHAT | {"model": "nope"})
    assert embedded.status_code == 400
    assert embedded.headers["x-weir-model-version"] == "l6-v2"
    assert streamed.status_code == 400
    assert streamed.headers["x-weir-model-version"] == "135m-instruct"
    assert unknown.status_code == 404
    assert "x-weir-model-version" not in unknown.headers


def test_api_keys_are_enforced() -> None:
    with make_client(FakeEngine(), api_keys=[SecretStr("sk-right")]) as client:
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 401
        wrong = client.post(
            "/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer sk-wrong"}
        )
        assert wrong.status_code == 401
        assert "sk-wrong" not in wrong.text
        validate("ErrorResponse", wrong.json())
        right = client.post(
            "/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer sk-right"}
        )
        assert right.status_code == 200
        assert client.get("/healthz").status_code == 200  # probes stay open


def test_unexpected_exception_is_a_500_with_request_id() -> None:
    class Broken(FakeEngine):
        async def complete(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
            raise ZeroDivisionError("hidden")

    with make_client(Broken()) as client:
        response = client.post("/v1/chat/completions", json=CHAT, headers={"x-request-id": "rid-9"})
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
    assert "rid-9" in response.json()["error"]["message"]
    assert "hidden" not in response.text


def smollm2_counter() -> TokenCounter:
    directory = ModelStore(StoreConfig().root).resolve("smollm2-135m-instruct")
    return TokenCounter.from_dir(directory, ["--max-model-len", "2048"])


def test_context_overflow_never_reaches_the_engine() -> None:
    engine = FakeEngine()
    counters = {VersionKey("smollm2", "135m-instruct"): smollm2_counter()}
    with make_client(engine, counters=counters) as client:
        response = client.post("/v1/chat/completions", json=CHAT | {"max_tokens": 2047})
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "context_length_exceeded"
        assert engine.calls == []
        ok = client.post("/v1/chat/completions", json=CHAT)
        assert ok.status_code == 200
        assert engine.calls[-1]["max_tokens"] == 2048 - smollm2_counter().count_chat(
            CHAT["messages"]
        )


SCHEMA_FORMAT = {
    "type": "json_schema",
    "json_schema": {
        "name": "city",
        "schema": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@pytest.mark.parametrize(
    ("content", "policy", "status", "valid"),
    [
        ('{"city": "Paris"}', "reject", 200, "true"),
        ('{"town": "Paris"}', "reject", 502, None),
        ("Paris!", "reject", 502, None),
        ('{"town": "Paris"}', "pass", 200, "false"),
    ],
)
def test_structured_output_is_checked(
    content: str, policy: str, status: int, valid: str | None
) -> None:
    contract = ContractConfig.model_validate({"invalid_output": policy})
    with make_client(FakeEngine(content=content), contract=contract) as client:
        body = CHAT | {"response_format": SCHEMA_FORMAT}
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == status
    assert response.headers.get("x-weir-output-valid") == valid
    if status == 502:
        assert response.json()["error"]["code"] == "invalid_model_output"
        validate("ErrorResponse", response.json())


@pytest.mark.parametrize("response_format", [{"type": "json_object"}, SCHEMA_FORMAT])
def test_structured_output_cut_off_by_max_tokens_is_passed_on(
    response_format: dict[str, Any],
) -> None:
    """As OpenAI answers it: 200 with the unfinished text and finish_reason "length" (the
    gateway's check was a 502 invalid_model_output), JSON and streamed alike; never said
    valid, since it was not checked."""
    engine = FakeEngine(words=['{"city": ', '"Par'], finish_reason="length")
    body = CHAT | {"response_format": response_format, "max_tokens": 2}
    with make_client(engine) as client:
        response = client.post("/v1/chat/completions", json=body)
        with client.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as s:
            events = sse(s.read().decode())
    assert response.status_code == 200
    validate("CreateChatCompletionResponse", response.json())
    choice = response.json()["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == ('{"city": "Par', "length")
    assert "x-weir-output-valid" not in response.headers
    assert events[-1] == "[DONE]"
    assert not any("error" in e for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "length"


EMBED: dict[str, Any] = {"model": "minilm", "input": "Hi"}
COMPLETE: dict[str, Any] = {"model": "smollm2", "prompt": "Hi"}
WIZARD = {"role": "wizard", "content": "x"}
# One matrix for the one path: route, body, status, error code, param.
MATRIX: list[tuple[str, bytes, int, str | None, str | None]] = [
    ("/v1/chat/completions", orjson.dumps(CHAT), 200, None, None),
    ("/v1/chat/completions", orjson.dumps(CHAT | {"stream": True}), 200, None, None),
    ("/v1/chat/completions", orjson.dumps(CHAT | {"temperature": 9}), 400, "invalid_request",
     "temperature"),
    ("/v1/chat/completions", orjson.dumps(CHAT | {"messages": [WIZARD]}), 400, "invalid_request",
     "messages[0].role"),
    ("/v1/chat/completions", orjson.dumps({"model": "smollm2"}), 400, "invalid_request",
     "messages"),
    ("/v1/chat/completions", orjson.dumps(CHAT | {"model": "nope"}), 404, "model_not_found",
     "model"),
    ("/v1/chat/completions", orjson.dumps([1, 2, 3]), 400, "invalid_request", None),
    ("/v1/chat/completions", b"{not json", 400, "invalid_request", None),
    ("/v1/chat/completions", b"", 400, "invalid_request", None),
    ("/v1/completions", orjson.dumps(COMPLETE), 200, None, None),
    ("/v1/completions", orjson.dumps(COMPLETE | {"stream": True}), 200, None, None),
    ("/v1/completions", orjson.dumps({"model": "smollm2"}), 400, "invalid_request", "prompt"),
    ("/v1/embeddings", orjson.dumps(EMBED), 200, None, None),
    ("/v1/embeddings", orjson.dumps({"model": "minilm"}), 400, "invalid_request", "input"),
    ("/v1/embeddings", orjson.dumps(EMBED | {"stream": True}), 400, "invalid_request", "stream"),
    ("/v1/embeddings", orjson.dumps(EMBED | {"model": "smollm2"}), 400, "model_not_supported",
     "model"),
]  # fmt: skip
ANSWERS = {
    "/v1/chat/completions": "CreateChatCompletionResponse",
    "/v1/completions": "CreateCompletionResponse",
    "/v1/embeddings": "CreateEmbeddingResponse",
}


@pytest.mark.parametrize(("path", "raw", "status", "code", "param"), MATRIX)
def test_each_model_route_answers_valid_bodies_and_refuses_bad_ones(
    client: TestClient, path: str, raw: bytes, status: int, code: str | None, param: str | None
) -> None:
    response = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert response.headers["x-request-id"]
    if status != 200:
        validate("ErrorResponse", response.json())
        error = response.json()["error"]
        assert (error["code"], error["param"]) == (code, param)
    elif b'"stream":true' in raw:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.text.endswith("data: [DONE]\n\n")
    else:
        validate(ANSWERS[path], response.json())


@pytest.mark.parametrize("path", list(ANSWERS))
def test_other_methods_on_a_model_route_are_405(client: TestClient, path: str) -> None:
    for method in ("GET", "PUT", "DELETE"):
        response = client.request(method, path)
        assert response.status_code == 405
        assert response.headers["allow"] == "POST"
        assert response.json()["error"]["code"] == "method_not_allowed"
        validate("ErrorResponse", response.json())


def test_the_openapi_document_lists_the_model_routes_with_their_bodies(
    client: TestClient,
) -> None:
    document = client.get("/openapi.json").json()
    for path in ANSWERS:
        operation = document["paths"][path]["post"]
        schema = operation["requestBody"]["content"]["application/json"]["schema"]
        assert schema["$ref"].startswith("#/components/schemas/")
        assert "429" in operation["responses"]
    assert "ChatCompletionRequest" in document["components"]["schemas"]
    assert "/weir/admin/keys" in document["paths"]  # the mounted app's routes as well


def test_a_body_that_is_not_declared_json_is_refused_clearly(client: TestClient) -> None:
    response = client.post(
        "/v1/chat/completions", content=orjson.dumps(CHAT), headers={"content-type": "text/plain"}
    )
    assert response.status_code == 400
    assert "must be JSON" in response.json()["error"]["message"]
    fine = client.post(
        "/v1/chat/completions",
        content=orjson.dumps(CHAT),
        headers={"content-type": "application/json; charset=utf-8"},
    )
    assert fine.status_code == 200
