"""Embedding inputs found in the cache are looked up before admission: a request whose
inputs are all cached reserves no tokens, so a token budget that its misses would exceed
never refuses it (issue 19: an all-cached request was refused 429 by ``model_tpm``)."""

from __future__ import annotations

from typing import Any

from starlette.testclient import TestClient

from models.config import StoreConfig
from models.engines.fleet import Fleet, Replica
from models.store import ModelStore
from models.tokenizer import TokenCounter
from models.types import ReplicaKey, VersionKey
from serving.http.app import create_app
from serving.settings import LimitsConfig, Settings
from tests.fakes.engine import FakeEngine

TEXTS = ["the quick brown fox jumps over the lazy dog " * 3, "a second sentence to embed"]


def client(engine: FakeEngine, model_tpm: int) -> TestClient:
    counter = TokenCounter.from_dir(ModelStore(StoreConfig().root).resolve("all-minilm-l6-v2"))
    settings = Settings(limits=LimitsConfig(model_tpm={"minilm": model_tpm}))

    def fleet(_: object) -> Fleet:
        return Fleet([
            Replica(ReplicaKey("smollm2", "135m-instruct", 0), FakeEngine(), "smollm2"),
            Replica(ReplicaKey("minilm", "l6-v2", 0), engine, "minilm"),
        ])  # fmt: skip

    app = create_app(
        settings, fleet_factory=fleet, counters={VersionKey("minilm", "l6-v2"): counter}
    )
    return TestClient(app, raise_server_exceptions=False)


def embed(c: TestClient, texts: list[str]) -> Any:
    return c.post("/v1/embeddings", json={"model": "minilm", "input": texts})


def test_cached_inputs_reserve_nothing_and_misses_only_theirs() -> None:
    engine = FakeEngine(name="embed")
    counter = TokenCounter.from_dir(ModelStore(StoreConfig().root).resolve("all-minilm-l6-v2"))
    first, second = counter.count_texts(TEXTS)
    # room for one request's tokens in the minute, not two
    with client(engine, model_tpm=first + second + 1) as c:
        assert embed(c, TEXTS).status_code == 200
        assert len(engine.calls) == 1
        for _ in range(5):  # all cached: admitted, answered from the cache, charged nothing
            again = embed(c, TEXTS)
            assert again.status_code == 200, again.text
            assert again.headers["x-weir-cache-hits"] == "2/2"
        assert len(engine.calls) == 1
        fresh = embed(c, ["a text never seen before, long enough to count " * 4])
        assert fresh.status_code == 429  # a miss still reserves its own tokens
        assert fresh.json()["error"]["code"] == "rate_limit_exceeded"
        assert len(engine.calls) == 1
