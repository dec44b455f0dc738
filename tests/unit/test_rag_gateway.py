"""Collections, search and RAG at the gateway (fake engines, real docstore and FAISS)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from starlette.testclient import TestClient

from models.engines.fleet import Fleet, Replica
from models.errors import EngineFailed
from models.types import ReplicaKey
from serving.http.app import create_app
from serving.settings import KeysConfig, RetrievalConfig, Settings
from tests.fakes.engine import FakeEngine
from tests.openai_spec import validate
from tests.unit.test_observe import sample

ADMIN = "admin-for-rag-tests"
FACT = "The access code for the blue door is 7731."


class Rig:
    def __init__(self, client: TestClient, chat: FakeEngine, embed: FakeEngine) -> None:
        self.client, self.chat, self.embed = client, chat, embed

    def key(self, **fields: Any) -> dict[str, str]:
        made = self.client.post(
            "/weir/admin/keys", json={"name": "r", **fields},
            headers={"authorization": f"Bearer {ADMIN}"},
        ).json()  # fmt: skip
        return {"authorization": f"Bearer {made['key']}"}


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    chat, embed = FakeEngine(), FakeEngine(name="embed")

    def fleet(_: object) -> Fleet:
        return Fleet(
            [
                Replica(ReplicaKey("smollm2", "135m-instruct", 0), chat, "smollm2"),
                Replica(ReplicaKey("minilm", "l6-v2", 0), embed, "minilm"),
            ],
            health_interval_s=0.05,
        )

    keys = KeysConfig(enabled=True, file=tmp_path / "keys.json", admin_key=SecretStr(ADMIN))
    retrieval = RetrievalConfig(path=tmp_path / "retrieval", timeout_s=1.0)
    settings = Settings(keys=keys, retrieval=retrieval)
    app = create_app(settings, fleet_factory=fleet, counters={})
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Rig(client, chat, embed)


def test_collections_documents_and_search(rig: Rig) -> None:
    a, b = rig.key(), rig.key()
    c = rig.client
    assert c.post("/v1/collections", json={"name": "notes"}, headers=a).status_code == 201
    again = c.post("/v1/collections", json={"name": "notes"}, headers=a)
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "collection_exists"
    assert c.post("/v1/collections", json={"name": "../x"}, headers=a).status_code == 400
    docs = {
        "documents": [
            {"id": "door", "text": FACT, "metadata": {"kind": "fact"}},
            {"text": "Bananas are yellow.", "metadata": {"kind": "fruit"}},
        ]
    }
    added = c.post("/v1/collections/notes/documents", json=docs, headers=a)
    assert added.status_code == 200
    assert added.json()["ids"][0] == "door"
    found = c.post("/v1/collections/notes/search", json={"query": FACT, "top_k": 2}, headers=a)
    hits = found.json()["data"]
    assert hits[0]["id"] == "door"
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert hits[0]["metadata"] == {"kind": "fact"}
    filtered = c.post(
        "/v1/collections/notes/search", json={"query": FACT, "filter": {"kind": "fruit"}}, headers=a
    ).json()["data"]
    assert [h["metadata"]["kind"] for h in filtered] == ["fruit"]
    # another tenant sees nothing of it
    hidden = c.post("/v1/collections/notes/search", json={"query": FACT}, headers=b)
    assert hidden.status_code == 404
    assert hidden.json()["error"]["code"] == "collection_not_found"
    assert c.get("/v1/collections", headers=b).json()["data"] == []
    listed = c.get("/v1/collections", headers=a).json()["data"]
    assert listed == [{"name": "notes", "shards": 1, "documents": 2, "chunks": 2}]
    assert c.delete("/v1/collections/notes/documents/door", headers=a).status_code == 200
    assert c.delete("/v1/collections/notes/documents/door", headers=a).status_code == 404
    left = c.post("/v1/collections/notes/search", json={"query": FACT, "top_k": 5}, headers=a)
    assert all(h["id"] != "door" for h in left.json()["data"])
    too_many = c.post("/v1/collections/notes/search", json={"query": "x", "top_k": 500}, headers=a)
    assert too_many.status_code == 400
    assert c.delete("/v1/collections/notes", headers=a).status_code == 200


def chat_with_retrieval(**spec: Any) -> dict[str, Any]:
    return {
        "model": "smollm2",
        "messages": [{"role": "user", "content": FACT}],
        "weir": {"retrieval": {"collection": "facts", **spec}},
    }


def test_rag_puts_passages_in_the_prompt_and_cites_them(rig: Rig) -> None:
    a = rig.key()
    rig.client.post("/v1/collections", json={"name": "facts"}, headers=a)
    rig.client.post(
        "/v1/collections/facts/documents",
        json={"documents": [{"id": "door", "text": FACT}, {"text": "Unrelated note."}]},
        headers=a,
    )
    answer = rig.client.post("/v1/chat/completions", json=chat_with_retrieval(top_k=1), headers=a)
    assert answer.status_code == 200
    assert answer.headers["x-weir-retrieval"] == "ok"
    citations = answer.json()["weir"]["retrieval"]["citations"]
    assert [c["document_id"] for c in citations] == ["door"]
    sent = rig.chat.calls[-1]["messages"]
    assert sent[0]["role"] == "system"
    assert "7731" in sent[0]["content"]
    assert "weir" not in rig.chat.calls[-1]
    validate("CreateChatCompletionResponse", answer.json())


def test_retrieval_down_degrades_unless_required(rig: Rig) -> None:
    a = rig.key()
    rig.client.post("/v1/collections", json={"name": "facts"}, headers=a)
    rig.embed.fail_with = EngineFailed("embedding engine down")
    degraded = rig.client.post("/v1/chat/completions", json=chat_with_retrieval(), headers=a)
    assert degraded.status_code == 200
    assert degraded.headers["x-weir-retrieval"] == "degraded"
    assert degraded.json()["weir"]["retrieval"] == {"status": "degraded", "citations": []}
    assert len(rig.chat.calls[-1]["messages"]) == 1  # no context, the question as asked
    refused = rig.client.post(
        "/v1/chat/completions", json=chat_with_retrieval(required=True), headers=a
    )
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "retrieval_unavailable"
    missing = rig.client.post(
        "/v1/chat/completions",
        json=chat_with_retrieval() | {"weir": {"retrieval": {"collection": "nope"}}},
        headers=a,
    )
    assert missing.status_code == 404
    text = rig.client.get("/metrics").text
    assert sample(text, "weir_retrieval_requests_total", result="degraded") == 1
    assert sample(text, "weir_retrieval_requests_total", result="refused") == 1


def test_ingest_files_through_the_api(rig: Rig, tmp_path: Path) -> None:
    from serving.cli.ingest import ingest

    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "door.md").write_text(FACT)
    (docs / "sub" / "fruit.txt").write_text("Bananas are yellow.")
    (docs / "more.jsonl").write_text(
        '{"id": "j1", "text": "Jupiter is large.", "metadata": {"kind": "planet"}}\n'
        '{"text": "Mars is red."}\n'
    )
    (docs / "skip.bin").write_bytes(b"\\x00")
    rig.client.headers.update(rig.key())
    assert ingest(rig.client, "files", docs, batch=2, show=False) == 4
    hits = rig.client.post("/v1/collections/files/search", json={"query": FACT}).json()["data"]
    assert hits[0]["id"] == "door.md"
    assert hits[0]["metadata"]["source"] == "door.md"
    planet = rig.client.post(
        "/v1/collections/files/search", json={"query": "Jupiter is large.", "top_k": 1}
    ).json()["data"]
    assert planet[0]["id"] == "j1"
    assert planet[0]["metadata"]["kind"] == "planet"
    # again: the same ids are replaced, not doubled
    assert ingest(rig.client, "files", docs, show=False) == 4
    listed = rig.client.get("/v1/collections").json()["data"]
    assert listed[0]["documents"] == 5  # 4 ids, plus the jsonl line without one, twice


def test_collections_count_against_the_keys_requests_per_minute(rig: Rig) -> None:
    a = rig.key(rpm=5)
    c = rig.client
    assert c.post("/v1/collections", json={"name": "notes"}, headers=a).status_code == 201
    docs = {"documents": [{"id": "door", "text": FACT}]}
    assert c.post("/v1/collections/notes/documents", json=docs, headers=a).status_code == 200
    search = {"query": FACT}
    assert c.post("/v1/collections/notes/search", json=search, headers=a).status_code == 200
    assert c.get("/v1/collections", headers=a).status_code == 200
    assert c.post("/v1/collections/notes/search", json=search, headers=a).status_code == 200
    calls = len(rig.embed.calls)
    refused = c.post("/v1/collections/notes/search", json=search, headers=a)
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "rate_limit_exceeded" or refused.headers.get(
        "retry-after"
    )
    assert len(rig.embed.calls) == calls  # refused before anything was embedded
    assert c.get("/v1/collections", headers=a).status_code == 429
    assert c.get("/v1/collections", headers=rig.key(rpm=5)).status_code == 200  # per key


def test_collections_and_rag_need_the_embedding_model_in_the_keys_list(rig: Rig) -> None:
    owner, chat_only = rig.key(), rig.key(models=["smollm2"])
    c = rig.client
    assert c.post("/v1/collections", json={"name": "facts"}, headers=chat_only).status_code == 403
    c.post("/v1/collections", json={"name": "facts"}, headers=owner)
    calls = len(rig.embed.calls)
    docs = {"documents": [{"text": FACT}]}
    added = c.post("/v1/collections/facts/documents", json=docs, headers=chat_only)
    assert added.status_code == 403
    assert added.json()["error"]["code"] == "permission_denied" or added.status_code == 403
    searched = c.post("/v1/collections/facts/search", json={"query": FACT}, headers=chat_only)
    assert searched.status_code == 403
    rag = c.post("/v1/chat/completions", json=chat_with_retrieval(), headers=chat_only)
    assert rag.status_code == 403
    assert len(rig.embed.calls) == calls  # the embedding model never ran for that key
    assert rig.chat.calls == []
    assert c.get("/v1/collections", headers=chat_only).status_code == 200  # nothing embedded
    allowed = rig.key(models=["smollm2", "minilm"])
    assert c.post("/v1/collections", json={"name": "x"}, headers=allowed).status_code == 201


def test_embeddings_for_collections_and_rag_charge_the_keys_tokens(rig: Rig) -> None:
    a = rig.key(tpm=40)  # no tokenizer here: about four characters a token
    c = rig.client
    assert c.post("/v1/collections", json={"name": "facts"}, headers=a).status_code == 201
    calls = len(rig.embed.calls)
    big = {"documents": [{"text": "word " * 60}]}  # about 75 tokens
    refused = c.post("/v1/collections/facts/documents", json=big, headers=a)
    assert refused.status_code == 429
    assert len(rig.embed.calls) == calls
    small = {"documents": [{"id": "door", "text": FACT}]}  # about 11 tokens
    assert c.post("/v1/collections/facts/documents", json=small, headers=a).status_code == 200
    for _ in range(2):  # each search's query charges about 11 more
        assert c.post("/v1/collections/facts/search", json={"query": FACT}, headers=a).is_success
    rag = c.post("/v1/chat/completions", json=chat_with_retrieval(), headers=a)
    assert rag.status_code == 429  # the query's embedding no longer fits the key's tpm


def test_rag_embeddings_are_cached_under_the_tenants_scope(rig: Rig) -> None:
    a, b = rig.key(), rig.key()
    c = rig.client
    c.post("/v1/collections", json={"name": "facts"}, headers=a)
    added = c.post(
        "/v1/collections/facts/documents", json={"documents": [{"text": FACT}]}, headers=a
    )
    assert added.status_code == 200
    cache = c.app.state.proxy.cache  # type: ignore[attr-defined]
    c.portal.call(cache.drain)  # type: ignore[union-attr]
    probe = {"model": "minilm", "input": [FACT]}
    theirs = c.post("/v1/embeddings", json=probe, headers=b)
    assert theirs.headers["x-weir-cache-hits"] == "0/1"  # b learns nothing of a's document
    own = c.post("/v1/embeddings", json=probe, headers=a)
    assert own.headers["x-weir-cache-hits"] == "1/1"  # a's document, embedded for a


def _embedded(rig: Rig) -> list[str]:
    return [t for call in rig.embed.calls for t in call["input"]]


def test_blank_text_is_refused_at_the_collections_api_never_embedded(rig: Rig) -> None:
    """/v1/embeddings refuses an empty string (OpenAI's spec; contract), but retrieval
    embeds through the proxy, past that check: a blank document or query is refused where
    it is sent (400 naming its field), so no empty text reaches the embedding engine."""
    a = rig.key()
    c = rig.client
    assert c.post("/v1/collections", json={"name": "notes"}, headers=a).status_code == 201
    for text in ("", " \n\t "):
        docs = {"documents": [{"text": FACT}, {"id": "blank", "text": text}]}
        added = c.post("/v1/collections/notes/documents", json=docs, headers=a)
        assert added.status_code == 400
        assert added.json()["error"]["param"] == "documents[1].text"
        put = c.put("/v1/collections/notes/documents/d", json={"text": text}, headers=a)
        assert put.status_code == 400
        assert put.json()["error"]["param"] == "text"
        found = c.post("/v1/collections/notes/search", json={"query": text}, headers=a)
        assert found.status_code == 400
        assert found.json()["error"]["param"] == "query"
    assert c.get("/v1/collections", headers=a).json()["data"][0]["documents"] == 0
    assert not [t for t in _embedded(rig) if not t.strip()]


@pytest.mark.parametrize(
    "content", ["", "  \n", [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]]
)
def test_rag_with_no_text_to_search_with_is_a_400(rig: Rig, content: Any) -> None:
    a = rig.key()
    rig.client.post("/v1/collections", json={"name": "facts"}, headers=a)
    body = chat_with_retrieval()
    body["messages"] = [{"role": "user", "content": content}]
    answer = rig.client.post("/v1/chat/completions", json=body, headers=a)
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "messages"
    assert "text" in answer.json()["error"]["message"]
    assert not [t for t in _embedded(rig) if not t.strip()]
    assert not rig.chat.calls
