"""``GET /v1/models/{model}`` through the official ``openai`` client, and vLLM's own routes
(``/v1/rerank``, ``/v1/score``, ``/tokenize``, ``/detokenize``) passed through the real
stack to real vLLM engines: rerank and score from all-MiniLM-L6-v2 (served with
``--runner pooling``), tokenize and detokenize from it and from SmolLM2."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from models.config import StoreConfig
from models.store import ModelStore
from models.tokenizer import TokenCounter
from tests.integration.stack import Stack
from tests.openai_spec import validate

pytestmark = pytest.mark.integration
QUERY = "What is the capital of France?"
DOCUMENTS = ["Bananas are yellow.", "Paris is the capital of France.", "Berlin is in Germany."]
MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": QUERY},
]
WEATHER: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    },
}  # fmt: skip
NO_CACHE = {"x-weir-cache-control": "bypass"}


def post(stack: Stack, path: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(f"{stack.base_url}{path}", json=body, headers=headers, timeout=120)


def minilm_counter() -> TokenCounter:
    return TokenCounter.from_dir(ModelStore(StoreConfig().root).resolve("all-minilm-l6-v2"))


def test_rerank_ranks_the_answer_first_and_counts_as_the_gateway_does(stack: Stack) -> None:
    response = post(stack, "/v1/rerank", {"model": "minilm", "query": QUERY,
                                          "documents": DOCUMENTS, "top_n": 2})  # fmt: skip
    assert response.status_code == 200, response.text
    assert response.headers["x-weir-model-version"] == "l6-v2"
    body = response.json()
    assert body["model"] == "minilm"
    results = body["results"]
    assert len(results) == 2
    assert results[0]["index"] == 1
    assert results[0]["document"]["text"] == DOCUMENTS[1]
    assert results[0]["relevance_score"] > results[1]["relevance_score"]
    # what the limits reserve (counted here) is what the engine reports
    counted = sum(minilm_counter().count_texts([QUERY, *DOCUMENTS]))
    assert body["usage"]["prompt_tokens"] == counted


def test_score_pairs_and_a_pin(stack: Stack) -> None:
    body = {"model": "minilm@l6-v2", "text_1": QUERY, "text_2": DOCUMENTS[:2]}
    response = post(stack, "/v1/score", body)
    assert response.status_code == 200, response.text
    scored = response.json()
    assert scored["model"] == "minilm@l6-v2"
    assert [d["index"] for d in scored["data"]] == [0, 1]
    assert scored["data"][1]["score"] > scored["data"][0]["score"]
    assert scored["usage"]["prompt_tokens"] == sum(
        minilm_counter().count_texts([QUERY, *DOCUMENTS[:2]])
    )
    by_header = post(stack, "/v1/score", body | {"model": "minilm"},
                     **{"x-weir-model-version": "l6-v2"})  # fmt: skip
    assert by_header.status_code == 200
    assert by_header.headers["x-weir-model-version"] == "l6-v2"
    uneven = post(stack, "/v1/score", {"model": "minilm", "text_1": ["a", "b", "c"],
                                       "text_2": ["a", "b"]})  # fmt: skip
    assert uneven.status_code == 400  # the engine's refusal, through the error table
    validate("ErrorResponse", uneven.json())
    assert "1:N" in uneven.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/v1/rerank", "/v1/score"])
def test_a_chat_model_cannot_score(stack: Stack, path: str) -> None:
    body = {"model": "smollm2", "query": QUERY, "documents": DOCUMENTS}
    if path == "/v1/score":
        body = {"model": "smollm2", "text_1": QUERY, "text_2": DOCUMENTS}
    response = post(stack, path, body)
    assert response.status_code == 400
    validate("ErrorResponse", response.json())
    assert response.json()["error"]["code"] == "model_not_supported"


@pytest.mark.parametrize("model", ["smollm2", "minilm"])
def test_tokenize_and_detokenize_round_trip(stack: Stack, model: str) -> None:
    tokenized = post(stack, "/tokenize", {"model": model, "prompt": "Hello world",
                                          "return_token_strs": True})  # fmt: skip
    assert tokenized.status_code == 200, tokenized.text
    tokens = tokenized.json()
    assert tokens["count"] == len(tokens["tokens"]) == len(tokens["token_strs"]) > 0
    assert tokens["max_model_len"] == (2048 if model == "smollm2" else 256)
    text = post(stack, "/detokenize", {"model": model, "tokens": tokens["tokens"]})
    assert text.status_code == 200, text.text
    assert "hello world" in text.json()["prompt"].lower()


@pytest.mark.parametrize("tools", [None, [WEATHER]])
def test_tokenize_counts_what_a_chat_completion_is_charged(
    stack: Stack, client: openai.OpenAI, tools: list[ChatCompletionToolParam] | None
) -> None:
    asked: dict[str, Any] = {"model": "smollm2", "messages": MESSAGES}
    if tools is not None:
        asked["tools"] = tools
    tokenized = post(stack, "/tokenize", asked)
    assert tokenized.status_code == 200, tokenized.text
    answer = client.chat.completions.create(
        model="smollm2", messages=MESSAGES, max_tokens=1, temperature=0,
        extra_headers=NO_CACHE, tools=tools if tools is not None else openai.omit,
    )  # fmt: skip
    assert answer.usage is not None
    assert tokenized.json()["count"] == answer.usage.prompt_tokens


def test_models_retrieve_through_the_client(stack: Stack, client: openai.OpenAI) -> None:
    for name in ("smollm2", "smollm2@135m-instruct", "minilm", "minilm@l6-v2"):
        model = client.models.retrieve(name)
        assert model.id == name
        assert model.object == "model"
        raw = httpx.get(f"{stack.base_url}/v1/models/{name}", timeout=30)
        validate("Model", orjson.loads(raw.content))
    listed = {m.id for m in client.models.list()}
    assert {"smollm2", "smollm2@135m-instruct", "minilm", "minilm@l6-v2"} <= listed
    for ghost in ("ghost", "smollm2@nope"):
        with pytest.raises(openai.NotFoundError) as caught:
            client.models.retrieve(ghost)
        error = caught.value.response.json()
        validate("ErrorResponse", error)
        assert error["error"]["code"] == "model_not_found"
