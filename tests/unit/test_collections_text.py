"""Text a tenant sends to /v1/collections that the docstore could not keep or answer.

PostgreSQL's text takes no NUL: a document whose id or text held one (in the body or the
path) failed its insert with the driver's error, a 500, and so did any read or delete by a
collection name or document id holding one (``%00`` in the path). A lone surrogate is no
UTF-8: pydantic refuses one in a string field, but metadata is any JSON, so one was stored
(escaped) on both stores and every search that found the document then failed to render
its answer: a 500 for the collection until the document went. Text to store is refused
where it is sent (400 naming the field); a name or id that cannot exist is not found (404).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr
from starlette.testclient import TestClient

from models.engines.fleet import Fleet, Replica
from models.types import ReplicaKey
from serving.http.app import create_app
from serving.settings import KeysConfig, RetrievalConfig, Settings
from tests.fakes.engine import FakeEngine
from tests.retrieval_db import fresh_database
from tests.unit.test_rag_gateway import ADMIN, Rig, chat_with_retrieval

JSON_TYPE = {"content-type": "application/json"}
DOCS = "/v1/collections/notes/documents"


@pytest.fixture(params=["sqlite", "postgresql"])
def rig(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Rig]:
    chat, embed = FakeEngine(), FakeEngine(name="embed")

    def fleet(_: object) -> Fleet:
        return Fleet([Replica(ReplicaKey("smollm2", "135m-instruct", 0), chat, "smollm2"),
                      Replica(ReplicaKey("minilm", "l6-v2", 0), embed, "minilm")],
                     health_interval_s=0.05)  # fmt: skip

    def gateway(url: str | None) -> Iterator[Rig]:
        keys = KeysConfig(enabled=True, file=tmp_path / "keys.json", admin_key=SecretStr(ADMIN))
        retrieval = RetrievalConfig(path=tmp_path / "retrieval", timeout_s=1.0,
                                    database_url=SecretStr(url) if url else None)  # fmt: skip
        app = create_app(Settings(keys=keys, retrieval=retrieval), fleet_factory=fleet,
                         counters={})  # fmt: skip
        with TestClient(app, raise_server_exceptions=False) as client:
            yield Rig(client, chat, embed)

    if request.param == "sqlite":
        yield from gateway(None)
    else:
        with fresh_database(request.getfixturevalue("postgres_url")) as url:
            yield from gateway(url)


def test_text_the_docstore_cannot_hold_is_a_400_naming_it(rig: Rig) -> None:
    a = rig.key()
    assert rig.client.post("/v1/collections", json={"name": "notes"}, headers=a).is_success
    cases = [
        ("POST", DOCS, '{"documents": [{"id": "a\\u0000b", "text": "x"}]}', "documents[0].id"),
        ("POST", DOCS, '{"documents": [{"text": "ok"}, {"text": "x\\u0000y"}]}',
         "documents[1].text"),
        ("POST", DOCS, '{"documents": [{"text": "x", "metadata": {"k\\ud800": "v"}}]}',
         "documents[0].metadata"),
        ("POST", DOCS, '{"documents": [{"text": "x", "metadata": {"k": ["\\udfff"]}}]}',
         "documents[0].metadata"),
        ("PUT", f"{DOCS}/ok", '{"text": "x\\u0000"}', "text"),
        ("PUT", f"{DOCS}/ok", '{"text": "x", "metadata": {"k": {"j": "\\ud800"}}}', "metadata"),
        ("PUT", f"{DOCS}/a%00b", '{"text": "x"}', "doc_id"),
        ("PUT", f"{DOCS}/{'x' * 257}", '{"text": "x"}', "doc_id"),  # over 256: was a 500 too
    ]  # fmt: skip
    for method, path, body, param in cases:
        answer = rig.client.request(method, path, content=body.encode(), headers=a | JSON_TYPE)
        assert answer.status_code == 400, (path, body, answer.text)
        error = answer.json()["error"]
        assert (error["type"], error["param"]) == ("invalid_request_error", param), body
    listed = rig.client.get("/v1/collections", headers=a).json()["data"]
    assert listed == [{"name": "notes", "shards": 1, "documents": 0, "chunks": 0}]
    found = rig.client.post("/v1/collections/notes/search", json={"query": "x"}, headers=a)
    assert found.status_code == 200, found.text


def test_a_name_or_id_that_cannot_exist_is_not_found(rig: Rig) -> None:
    a = rig.key()
    assert rig.client.post("/v1/collections", json={"name": "notes"}, headers=a).is_success
    for method, path, body in [
        ("DELETE", f"{DOCS}/a%00b", None),
        ("DELETE", "/v1/collections/no%00tes", None),
        ("POST", "/v1/collections/no%00tes/search", {"query": "x"}),
        ("POST", "/v1/collections/no%00tes/documents", {"documents": [{"text": "x"}]}),
        ("PUT", "/v1/collections/no%00tes/documents/d", {"text": "x"}),
    ]:
        answer = rig.client.request(method, path, json=body, headers=a)
        assert answer.status_code == 404, (method, path, answer.text)
    spec = chat_with_retrieval() | {"weir": {"retrieval": {"collection": "no\x00tes"}}}
    answer = rig.client.post("/v1/chat/completions", json=spec, headers=a)
    assert answer.status_code == 404, answer.text
    assert answer.json()["error"]["code"] == "collection_not_found"


def test_other_text_is_kept_and_found(rig: Rig) -> None:
    a = rig.key()
    assert rig.client.post("/v1/collections", json={"name": "notes"}, headers=a).is_success
    metadata = {"k é\t": "v 🙂", "nul": "a\x00b", "n": [1, {"x": None}]}  # NUL: stored escaped
    added = rig.client.post(DOCS, json={"documents": [
        {"id": "é\t🙂", "text": "tab\there é 🙂", "metadata": metadata}]}, headers=a)  # fmt: skip
    assert added.status_code == 200, added.text
    query = {"query": "x\x00", "filter": {"nul": "a\x00b"}}  # not stored: searched as sent
    found = rig.client.post("/v1/collections/notes/search", json=query, headers=a)
    assert found.status_code == 200, found.text
    [hit] = found.json()["data"]
    assert (hit["id"], hit["text"], hit["metadata"]) == ("é\t🙂", "tab\there é 🙂", metadata)
    assert rig.client.delete(f"{DOCS}/%C3%A9%09%F0%9F%99%82", headers=a).status_code == 200
