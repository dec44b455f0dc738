"""The real stack through the official ``openai`` client, checked against OpenAI's spec."""

from __future__ import annotations

import math

import httpx
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.integration.stack import Stack
from tests.openai_spec import validate

pytestmark = pytest.mark.integration
SYSTEM: ChatCompletionMessageParam = {"role": "system", "content": "You are a helpful assistant."}
QUESTION: ChatCompletionMessageParam = {"role": "user", "content": "What is the capital of France?"}


def test_chat_names_paris(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="smollm2", messages=[SYSTEM, QUESTION], temperature=0, max_tokens=32
    )
    assert "Paris" in (answer.choices[0].message.content or "")
    assert answer.model == "smollm2"
    assert answer.usage is not None
    assert answer.usage.completion_tokens > 0


def test_chat_response_validates_and_is_labelled(stack: Stack) -> None:
    body = {"model": "smollm2", "messages": [SYSTEM, QUESTION], "temperature": 0, "max_tokens": 8}
    response = httpx.post(f"{stack.base_url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200
    validate("CreateChatCompletionResponse", response.json())
    assert response.headers["x-weir-model-version"] == "135m-instruct"
    assert len(response.headers["x-request-id"]) >= 16


def test_stream_through_the_client(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="smollm2",
        messages=[SYSTEM, QUESTION],
        temperature=0,
        max_tokens=32,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-weir-cache-control": "bypass"},  # the engine's own stream, not a replay
    )
    chunks = list(stream)
    contents = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert len(contents) > 1
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0
    assert "Paris" in "".join(contents)


def test_raw_stream_validates_and_ends_with_done(stack: Stack) -> None:
    body = {
        "model": "smollm2",
        "messages": [SYSTEM, QUESTION],
        "max_tokens": 16,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events: list[bytes] = []
    with httpx.stream("POST", f"{stack.base_url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:].encode())
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
    finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finish) == 1
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["total_tokens"] > 0


def test_completion(client: openai.OpenAI, stack: Stack) -> None:
    answer = client.completions.create(
        model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert answer.choices[0].text.strip()
    raw = httpx.post(
        f"{stack.base_url}/v1/completions",
        json={"model": "smollm2", "prompt": "Hello", "max_tokens": 4},
        timeout=60,
    )
    validate("CreateCompletionResponse", raw.json())


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_embeddings_rank_a_paraphrase_above_an_unrelated_text(
    client: openai.OpenAI, stack: Stack
) -> None:
    texts = [
        "A man is playing a guitar on stage.",
        "Someone performs music with a guitar in front of an audience.",
        "The stock market fell sharply on Tuesday.",
    ]
    result = client.embeddings.create(model="minilm", input=texts)
    vectors = [d.embedding for d in result.data]
    assert [len(v) for v in vectors] == [384, 384, 384]
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.2
    raw = httpx.post(
        f"{stack.base_url}/v1/embeddings", json={"model": "minilm", "input": texts[:2]}, timeout=60
    )
    validate("CreateEmbeddingResponse", raw.json())
    assert len(raw.json()["data"]) == 2


def test_models_lists_both(client: openai.OpenAI, stack: Stack) -> None:
    ids = {m.id for m in client.models.list()}
    assert {"smollm2", "minilm"} <= ids
    validate("ListModelsResponse", httpx.get(f"{stack.base_url}/v1/models").json())


def test_unknown_model_is_a_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-17", messages=[QUESTION])
    assert caught.value.code == "model_not_found"


def test_bad_bodies_are_400(stack: Stack) -> None:
    url = f"{stack.base_url}/v1/chat/completions"
    not_json = httpx.post(url, content=b"{oops", headers={"content-type": "application/json"})
    missing = httpx.post(url, json={"model": "smollm2"})
    for response in (not_json, missing):
        assert response.status_code == 400
        validate("ErrorResponse", response.json())
    assert missing.json()["error"]["param"] == "messages"


def test_engine_rejection_is_a_400_not_a_500(stack: Stack) -> None:
    """A body our contract lets through (vLLM's own ``min_tokens``) and vLLM refuses: the
    engine's 400 reaches the client as an OpenAI error, in its words."""
    body = {"model": "smollm2", "messages": [QUESTION], "max_tokens": 10, "min_tokens": 50}
    response = httpx.post(f"{stack.base_url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    validate("ErrorResponse", response.json())
    assert response.json()["error"]["code"] == "invalid_request"
    assert "min_tokens" in response.json()["error"]["message"]  # vLLM's words, not ours
