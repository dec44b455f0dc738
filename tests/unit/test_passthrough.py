"""``GET /v1/models/{model}`` and vLLM's pass-through routes (``/v1/rerank``, ``/v1/score``,
``/tokenize``, ``/detokenize``) through the gateway in-process, with fake engines that
answer those paths as vLLM does (shapes taken from vLLM 0.32 on all-MiniLM-L6-v2)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from starlette.testclient import TestClient

from models.config import StoreConfig
from models.engines.fleet import Fleet, Replica
from models.store import ModelStore
from models.tokenizer import TokenCounter
from models.types import ReplicaKey, VersionKey
from serving.core import tools as tool_rules
from serving.http.app import create_app
from serving.protocol.passthrough import MAX_DOCUMENTS, MAX_TEXT_CHARS
from serving.settings import CacheConfig, KeysConfig, Settings
from tests.fakes.engine import FakeEngine
from tests.openai_spec import validate
from tests.windows import hold_limit_window

JSON = dict[str, Any]
ADMIN = "admin-secret-for-passthrough-tests"
RERANK: JSON = {
    "model": "minilm",
    "query": "capital of France",
    "documents": ["Paris is the capital of France.", "Bananas are yellow.", "Berlin is in Germany"],
}
SCORE: JSON = {"model": "minilm", "text_1": "capital of France", "text_2": ["Paris", "Bananas"]}
TOKENIZE: JSON = {"model": "smollm2", "prompt": "Hello world"}
DETOKENIZE: JSON = {"model": "smollm2", "tokens": [101, 7592, 2088, 102]}
MESSAGES = [{"role": "user", "content": "Hi"}]


@dataclass
class PassEngine(FakeEngine):
    """The fake engine, answering vLLM's scoring and tokenizer paths too."""

    paths: list[str] = field(default_factory=list)

    async def complete(self, path: str, body: JSON) -> JSON:
        self.paths.append(path)
        if path not in ("/rerank", "/score", "/tokenize", "/detokenize"):
            return await super().complete(path, body)
        self.calls.append(body)
        await self._before()
        if path == "/rerank":
            results = [
                {"index": i, "document": {"text": d, "multi_modal": None}, "relevance_score": 0.5}
                for i, d in enumerate(body["documents"])
            ]
            usage: JSON = {"prompt_tokens": 7, "total_tokens": 7}
            return {"id": "score-1", "model": body["model"], "usage": usage, "results": results}
        if path == "/score":
            second = next(body[k] for k in ("documents", "items", "data_2", "text_2") if k in body)
            data = [{"index": i, "object": "score", "score": 0.5} for i in range(len(second))]
            usage = {"prompt_tokens": 7, "total_tokens": 7, "completion_tokens": 0,
                     "prompt_tokens_details": None, "completion_tokens_details": None}  # fmt: skip
            return {"id": "score-2", "object": "list", "created": 1, "model": body["model"],
                    "data": data, "usage": usage}  # fmt: skip
        if path == "/tokenize":
            tokens = [1, 2, 3]
            return {"count": 3, "max_model_len": 2048, "tokens": tokens, "token_strs": None}
        return {"prompt": " ".join(str(t) for t in body["tokens"])}


def app_for(
    chat: PassEngine,
    embed: PassEngine,
    *,
    keys: KeysConfig | None = None,
    counters: dict[VersionKey, TokenCounter] | None = None,
    cache: bool = False,
) -> TestClient:
    def fleet(_: object) -> Fleet:
        return Fleet(
            [
                Replica(ReplicaKey("smollm2", "135m-instruct", 0), chat, "smollm2"),
                Replica(ReplicaKey("minilm", "l6-v2", 0), embed, "minilm"),
            ],
            health_interval_s=0.05,
        )

    settings = Settings(keys=keys or KeysConfig(), cache=CacheConfig(enabled=cache))
    app = create_app(settings, fleet_factory=fleet, counters=counters or {})
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture
def chat() -> PassEngine:
    return PassEngine(name="chat")


@pytest.fixture
def embed() -> PassEngine:
    return PassEngine(name="embed")


@pytest.fixture
def client(chat: PassEngine, embed: PassEngine) -> Iterator[TestClient]:
    with app_for(chat, embed) as made:
        yield made


@pytest.fixture
def keyed(chat: PassEngine, embed: PassEngine, tmp_path: Path) -> Iterator[TestClient]:
    keys = KeysConfig(enabled=True, file=tmp_path / "keys.json", admin_key=SecretStr(ADMIN))
    with app_for(chat, embed, keys=keys) as made:
        hold_limit_window(made.app)  # its minute never ends under a test
        yield made


def bearer(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


def new_key(client: TestClient, **fields: Any) -> str:
    made = client.post("/weir/admin/keys", json={"name": "t", **fields}, headers=bearer(ADMIN))
    assert made.status_code == 200, made.text
    return str(made.json()["key"])


def error_of(response: Any, status: int, code: str) -> JSON:
    assert response.status_code == status, response.text
    body: JSON = response.json()
    validate("ErrorResponse", body)
    assert body["error"]["code"] == code
    return body


# --- GET /v1/models/{model} -------------------------------------------------------------


def test_retrieve_an_alias_and_a_pin(client: TestClient) -> None:
    alias = client.get("/v1/models/smollm2")
    assert alias.status_code == 200
    validate("Model", alias.json())
    assert alias.json()["id"] == "smollm2"
    assert alias.json()["weir"] == {"split": {"135m-instruct": 1.0}, "current": "135m-instruct"}
    pin = client.get("/v1/models/minilm@l6-v2")
    assert pin.status_code == 200
    validate("Model", pin.json())
    assert pin.json()["id"] == "minilm@l6-v2"
    assert "weir" not in pin.json()
    listed = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
    assert listed["smollm2"] == alias.json()  # the same card /v1/models lists
    assert listed["minilm@l6-v2"] == pin.json()


@pytest.mark.parametrize("name", ["ghost", "smollm2@nope", "smollm2@", "ghost@v1", "a/b"])
def test_unknown_ids_are_openai_404s(client: TestClient, name: str) -> None:
    body = error_of(client.get(f"/v1/models/{name}"), 404, "model_not_found")
    assert body["error"]["message"] == f"The model '{name}' does not exist."
    assert body["error"]["type"] == "invalid_request_error"


def test_a_model_the_key_may_not_use_is_the_same_404(keyed: TestClient) -> None:
    secret = new_key(keyed, models=["minilm"])
    assert keyed.get("/v1/models/minilm", headers=bearer(secret)).status_code == 200
    assert keyed.get("/v1/models/minilm@l6-v2", headers=bearer(secret)).status_code == 200
    hidden = keyed.get("/v1/models/smollm2", headers=bearer(secret))
    ghost = keyed.get("/v1/models/smollm3", headers=bearer(secret))
    error_of(hidden, 404, "model_not_found")
    assert hidden.json()["error"] == ghost.json()["error"] | {
        "message": "The model 'smollm2' does not exist."
    }  # the same answer, but for the name asked
    pinned = keyed.get("/v1/models/smollm2@135m-instruct", headers=bearer(secret))
    error_of(pinned, 404, "model_not_found")
    assert keyed.get("/v1/models/minilm").status_code == 401  # no key: no answer


# --- the pass-through routes ------------------------------------------------------------


def test_rerank_is_forwarded_to_the_engines_own_path(client: TestClient, embed: PassEngine) -> None:
    response = client.post("/v1/rerank", json=RERANK | {"top_n": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "minilm"
    assert [r["index"] for r in body["results"]] == [0, 1, 2]
    assert body["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    assert response.headers["x-weir-model-version"] == "l6-v2"
    assert embed.paths == ["/rerank"]  # vLLM's own path (its /v1/rerank logs a deprecation)
    assert embed.calls[-1] == RERANK | {"top_n": 2}


def test_score_every_pair_naming(client: TestClient, embed: PassEngine) -> None:
    response = client.post("/v1/score", json=SCORE)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "minilm"
    assert [d["score"] for d in response.json()["data"]] == [0.5, 0.5]
    assert embed.paths == ["/score"]
    assert embed.calls[-1] == SCORE
    for first, second in (("queries", "documents"), ("queries", "items"), ("data_1", "data_2")):
        body = {"model": "minilm", first: ["a"], second: ["b"]}
        scored = client.post("/v1/score", json=body)
        assert scored.status_code == 200, scored.text
        assert embed.calls[-1] == body  # passed on as vLLM names it
    assert embed.paths == ["/score"] * 4


@pytest.mark.parametrize("model", ["smollm2", "minilm"])
def test_tokenize_and_detokenize_serve_both_tasks(
    client: TestClient, chat: PassEngine, embed: PassEngine, model: str
) -> None:
    engine = chat if model == "smollm2" else embed
    tokenized = client.post("/tokenize", json=TOKENIZE | {"model": model})
    assert tokenized.status_code == 200, tokenized.text
    assert tokenized.json() == {"count": 3, "max_model_len": 2048, "tokens": [1, 2, 3],
                                "token_strs": None}  # fmt: skip
    chatty = client.post("/tokenize", json={"model": model, "messages": MESSAGES,
                                            "add_generation_prompt": True})  # fmt: skip
    assert chatty.status_code == 200, chatty.text
    text = client.post("/detokenize", json=DETOKENIZE | {"model": model})
    assert text.status_code == 200, text.text
    assert text.json() == {"prompt": "101 7592 2088 102"}
    assert engine.paths == ["/tokenize", "/tokenize", "/detokenize"]
    assert engine.calls[1]["messages"] == MESSAGES
    assert text.headers["x-weir-model-version"] in ("135m-instruct", "l6-v2")


@pytest.mark.parametrize("path", ["/v1/rerank", "/v1/score"])
def test_scoring_a_chat_model_is_a_clear_400(
    client: TestClient, chat: PassEngine, path: str
) -> None:
    body = (RERANK if path == "/v1/rerank" else SCORE) | {"model": "smollm2"}
    refused = error_of(client.post(path, json=body), 400, "model_not_supported")
    assert refused["error"]["message"] == (
        f"The model 'smollm2' is a chat model; it does not serve {path}."
    )
    assert refused["error"]["param"] == "model"
    assert chat.paths == []


def test_pins_by_name_and_by_header(client: TestClient, embed: PassEngine) -> None:
    pinned = client.post("/v1/rerank", json=RERANK | {"model": "minilm@l6-v2"})
    assert pinned.status_code == 200
    assert pinned.json()["model"] == "minilm@l6-v2"
    header = client.post("/tokenize", json=TOKENIZE, headers={"x-weir-model-version": "nope"})
    error_of(header, 404, "model_not_found")
    ok = client.post("/tokenize", json=TOKENIZE, headers={"x-weir-model-version": "135m-instruct"})
    assert ok.status_code == 200
    assert ok.headers["x-weir-model-version"] == "135m-instruct"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/rerank", RERANK | {"documents": ["d"] * (MAX_DOCUMENTS + 1)}, "documents"),
        ("/v1/rerank", RERANK | {"documents": []}, "documents"),
        ("/v1/rerank", RERANK | {"query": "q" * (MAX_TEXT_CHARS + 1)}, "query"),
        ("/v1/rerank", RERANK | {"top_n": -1}, "top_n"),
        ("/v1/rerank", RERANK | {"documents": [{"content": [{"type": "text"}]}]}, "documents"),
        ("/v1/rerank", RERANK | {"stream": True}, "stream"),
        ("/v1/score", {"model": "minilm", "text_1": "a"}, None),
        ("/v1/score", SCORE | {"queries": ["a"], "documents": ["b"]}, None),
        ("/v1/score", SCORE | {"items": ["b"]}, None),
        ("/tokenize", {"model": "smollm2"}, None),
        ("/tokenize", TOKENIZE | {"messages": MESSAGES}, None),
        ("/tokenize", TOKENIZE | {"tools": []}, None),
        ("/tokenize", {"model": "smollm2", "messages": MESSAGES, "chat_template": "{{ x }}"},
         "chat_template"),
        ("/tokenize", {"model": "smollm2", "messages": MESSAGES, "add_generation_prompt": True,
                       "continue_final_message": True}, None),
        ("/tokenize", {"model": "smollm2", "messages": MESSAGES,
                       "tools": [{"type": "function", "function": "x"}]}, "tools[0].function"),
        ("/tokenize", {"model": "smollm2", "messages": [{"role": "tool", "content": "1"}]},
         "messages[0].tool_call_id"),
        ("/detokenize", {"model": "smollm2", "tokens": [-1]}, "tokens[0]"),
        ("/detokenize", {"model": "smollm2", "tokens": [2**40]}, "tokens[0]"),
        ("/detokenize", {"model": "smollm2"}, "tokens"),
    ],
)  # fmt: skip
def test_bad_bodies_are_400s_before_any_engine(
    client: TestClient,
    chat: PassEngine,
    embed: PassEngine,
    path: str,
    body: JSON,
    param: str | None,
) -> None:
    refused = error_of(client.post(path, json=body), 400, "invalid_request")
    if param is not None:
        assert refused["error"]["param"] == param
    assert chat.paths == embed.paths == []


def test_engine_errors_go_through_the_table(chat: PassEngine, embed: PassEngine) -> None:
    from models.errors import EngineRejected

    embed.fail_with = EngineRejected("Input lengths must be either 1:1, 1:N or N:N", status=400)
    with app_for(chat, embed) as client:
        refused = error_of(client.post("/v1/score", json=SCORE), 400, "invalid_request")
    assert "1:N" in refused["error"]["message"]


def test_limits_charge_what_the_engine_reports(keyed: TestClient) -> None:
    secret = new_key(keyed, tpm=1000, rpm=100)
    headers = bearer(secret)
    remaining = "x-ratelimit-remaining-tokens"
    # no local tokenizer here: nothing reserved, each answer settles to what it used
    assert keyed.post("/v1/rerank", json=RERANK, headers=headers).headers[remaining] == "1000"
    tokenized = keyed.post("/tokenize", json=TOKENIZE, headers=headers)
    assert tokenized.headers[remaining] == str(1000 - 7)  # the rerank's usage.total_tokens
    text = keyed.post("/detokenize", json=DETOKENIZE, headers=headers)  # reserves its 4 ids
    assert text.headers[remaining] == str(1000 - 7 - 3 - 4)  # the tokenize's count
    after = keyed.post("/v1/score", json=SCORE, headers=headers)
    assert after.headers[remaining] == str(1000 - 7 - 3 - 4)
    last = keyed.post("/tokenize", json=TOKENIZE, headers=headers)
    assert last.headers[remaining] == str(1000 - 7 - 3 - 4 - 7)


def test_keys_model_lists_apply(keyed: TestClient, embed: PassEngine) -> None:
    secret = new_key(keyed, models=["smollm2"])
    refused = keyed.post("/v1/rerank", json=RERANK, headers=bearer(secret))
    error_of(refused, 403, "permission_denied")
    assert keyed.post("/tokenize", json=TOKENIZE, headers=bearer(secret)).status_code == 200
    assert keyed.post("/tokenize", json=TOKENIZE).status_code == 401
    assert embed.paths == []


def minilm_counter() -> TokenCounter:
    return TokenCounter.from_dir(ModelStore(StoreConfig().root).resolve("all-minilm-l6-v2"))


def test_a_rerank_reserves_its_counted_tokens(
    chat: PassEngine, embed: PassEngine, tmp_path: Path
) -> None:
    """vLLM 0.32 said ``prompt_tokens: 26`` for this rerank on all-MiniLM-L6-v2 (the query
    once, each document once, special tokens included); the gateway counts the same."""
    keys = KeysConfig(enabled=True, file=tmp_path / "keys.json", admin_key=SecretStr(ADMIN))
    counters = {VersionKey("minilm", "l6-v2"): minilm_counter()}
    with app_for(chat, embed, keys=keys, counters=counters) as client:
        hold_limit_window(client.app)
        secret = new_key(client, tpm=1000)
        response = client.post("/v1/rerank", json=RERANK, headers=bearer(secret))
    assert response.status_code == 200
    assert response.headers["x-ratelimit-remaining-tokens"] == str(1000 - 26)


def smollm2_counter() -> TokenCounter:
    directory = ModelStore(StoreConfig().root).resolve("smollm2-135m-instruct")
    return TokenCounter.from_dir(directory, ["--max-model-len", "2048"])


def test_a_tokenize_reserves_what_the_chat_route_counts(
    chat: PassEngine, embed: PassEngine, tmp_path: Path
) -> None:
    keys = KeysConfig(enabled=True, file=tmp_path / "keys.json", admin_key=SecretStr(ADMIN))
    counter = smollm2_counter()
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    expected = counter.count_chat(MESSAGES, tool_rules.rendered([tool]))  # as chat counts
    with app_for(chat, embed, keys=keys, counters={counter_key(): counter}) as client:
        hold_limit_window(client.app)
        secret = new_key(client, tpm=1000)
        body = {"model": "smollm2", "messages": MESSAGES, "tools": [tool]}
        response = client.post("/tokenize", json=body, headers=bearer(secret))
        assert response.status_code == 200, response.text
        assert response.headers["x-ratelimit-remaining-tokens"] == str(1000 - expected)
        after = client.post("/tokenize", json=TOKENIZE, headers=bearer(secret))
    assert after.headers["x-ratelimit-remaining-tokens"] == str(
        1000 - 3 - counter.count_texts(["Hello world"])[0]
    )  # the first charged the engine's count (3), the second reserves its prompt's


def counter_key() -> VersionKey:
    return VersionKey("smollm2", "135m-instruct")


def test_never_cached(chat: PassEngine, embed: PassEngine) -> None:
    with app_for(chat, embed, cache=True) as client:
        answers = [client.post("/tokenize", json=TOKENIZE) for _ in range(2)]
        answers += [client.post("/v1/rerank", json=RERANK) for _ in range(2)]
        metrics = client.get("/metrics").text
    assert all(a.status_code == 200 for a in answers)
    assert all("x-weir-cache" not in a.headers for a in answers)
    assert chat.paths == ["/tokenize", "/tokenize"]
    assert embed.paths == ["/rerank", "/rerank"]
    assert 'weir_cache_requests_total{kind="response"' not in metrics  # never asked
    with app_for(chat, embed, cache=True) as client:  # while it serves a chat route
        chat_body = {"model": "smollm2", "messages": MESSAGES, "temperature": 0}
        replies = [client.post("/v1/chat/completions", json=chat_body)]
        drain = client.app.state.proxy.cache.drain  # type: ignore[attr-defined]
        client.portal.call(drain)  # type: ignore[union-attr]
        replies.append(client.post("/v1/chat/completions", json=chat_body))
    assert [r.headers["x-weir-cache"] for r in replies] == ["miss", "hit"]


def test_metrics_count_each_route(client: TestClient) -> None:
    client.post("/v1/rerank", json=RERANK)
    client.post("/tokenize", json=TOKENIZE)
    client.post("/v1/rerank", json=RERANK | {"model": "smollm2"})
    metrics = client.get("/metrics").text
    lines = [line for line in metrics.splitlines() if line.startswith("weir_requests_total{")]
    assert any('route="/v1/rerank"' in x and 'status="200"' in x for x in lines), lines
    assert any('route="/v1/rerank"' in x and 'status="400"' in x for x in lines), lines
    assert any('route="/tokenize"' in x and 'model="smollm2"' in x for x in lines), lines


def test_openapi_lists_the_routes(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/v1/rerank", "/v1/score", "/tokenize", "/detokenize"):
        assert "post" in paths[path], path
    assert "get" in paths["/v1/models/{model}"]
    assert "404" in paths["/v1/models/{model}"]["get"]["responses"]
