"""RAG with the real engines: a fact only a collection knows reaches the model's answer."""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.integration.stack import Stack

pytestmark = pytest.mark.integration

FACT = "The access code for the blue door is 7731."
QUESTION = {"role": "user", "content": "What is the access code for the blue door?"}


def ask(stack: Stack, collection: str | None) -> httpx.Response:
    body = {
        "model": "smollm2",
        "messages": [QUESTION],
        "temperature": 0,
        "max_tokens": 24,
    }
    if collection is not None:
        body["weir"] = {"retrieval": {"collection": collection, "top_k": 2}}
    return httpx.post(f"{stack.base_url}/v1/chat/completions", json=body, timeout=120)


def test_a_fact_in_a_collection_reaches_the_answer(stack: Stack) -> None:
    name = f"facts-{uuid.uuid4().hex[:8]}"
    base = stack.base_url
    assert httpx.post(f"{base}/v1/collections", json={"name": name}).status_code == 201
    documents = [
        {"id": "door", "text": FACT},
        {"id": "kitchen", "text": "The kitchen is painted green and has two windows."},
        {"id": "garden", "text": "Tomatoes in the garden are watered every morning."},
    ]
    added = httpx.post(
        f"{base}/v1/collections/{name}/documents", json={"documents": documents}, timeout=120
    )
    assert added.status_code == 200
    hits = httpx.post(
        f"{base}/v1/collections/{name}/search", json={"query": QUESTION["content"], "top_k": 1}
    ).json()["data"]
    assert hits[0]["id"] == "door"  # MiniLM finds it

    without = ask(stack, None).json()["choices"][0]["message"]["content"]
    answer = ask(stack, name)
    assert answer.status_code == 200
    assert answer.headers["x-weir-retrieval"] == "ok"
    content = answer.json()["choices"][0]["message"]["content"]
    print(f"\nwithout retrieval: {without!r}\nwith retrieval: {content!r}")
    assert "7731" not in without
    assert "7731" in content
    citations = answer.json()["weir"]["retrieval"]["citations"]
    assert citations[0]["document_id"] == "door"
