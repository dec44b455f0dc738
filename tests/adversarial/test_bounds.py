"""Hostile request bodies get bounded-time 4xx answers, and never stall other requests.

The real gateway in-process (fake engines, the real SmolLM2 and MiniLM tokenizers from the
model store), with keys and a tokens-per-minute limit where the reservation matters.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
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
from serving.core import contract
from serving.protocol.requests import MAX_JSON_DEPTH, MAX_LOGIT_BIAS, MAX_PROMPTS
from serving.settings import ContractConfig, KeysConfig, Settings
from tests.fakes.engine import FakeEngine

ADMIN = "admin-secret-for-bound-tests"
CHAT: dict[str, Any] = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}
HUGE = 3_900_000  # characters: under the 4 MiB body limit
WORDS = "word " * (HUGE // 5)
SMOLLM2 = VersionKey("smollm2", "135m-instruct")
MINILM = VersionKey("minilm", "l6-v2")


def store_dir(entry: str) -> Path:
    return ModelStore(StoreConfig().root).resolve(entry)


@pytest.fixture(scope="module")
def counters() -> dict[VersionKey, TokenCounter]:
    return {
        SMOLLM2: TokenCounter.from_dir(
            store_dir("smollm2-135m-instruct"), ["--max-model-len", "2048"]
        ),
        MINILM: TokenCounter.from_dir(store_dir("all-minilm-l6-v2")),
    }


def gateway(
    tmp_path: Path, counters: dict[VersionKey, TokenCounter], engine: FakeEngine
) -> TestClient:
    from serving.http.app import create_app

    def fleet(_: object) -> Fleet:
        return Fleet(
            [
                Replica(ReplicaKey("smollm2", "135m-instruct", 0), engine, "smollm2"),
                Replica(ReplicaKey("minilm", "l6-v2", 0), FakeEngine(name="embed"), "minilm"),
            ],
            health_interval_s=0.05,
        )

    keys = KeysConfig(enabled=True, file=tmp_path / "keys.json", admin_key=SecretStr(ADMIN))
    settings = Settings(keys=keys, contract=ContractConfig())
    app = create_app(settings, fleet_factory=fleet, counters=counters)
    return TestClient(app, raise_server_exceptions=False)


def bearer(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(
    tmp_path: Path, counters: dict[VersionKey, TokenCounter], engine: FakeEngine
) -> Iterator[TestClient]:
    with gateway(tmp_path, counters, engine) as made:
        yield made


@pytest.fixture
def auth(client: TestClient) -> dict[str, str]:
    answer = client.post("/weir/admin/keys", json={"name": "t"}, headers=bearer(ADMIN))
    return bearer(str(answer.json()["key"]))


def refused(answer: Any, param: str | None, status: int = 400) -> dict[str, Any]:
    assert answer.status_code == status, answer.text[:300]
    error: dict[str, Any] = answer.json()["error"]
    if param is not None:
        assert error["param"] == param, error
    return error


def while_probing(client: TestClient, work: list[Any]) -> tuple[list[Any], float]:
    """Runs each of ``work`` (callables) in its own thread; meanwhile polls /healthz and
    returns the work's results and the slowest health answer."""
    results: list[Any] = [None] * len(work)

    def run(index: int) -> None:
        results[index] = work[index]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(work))]
    for thread in threads:
        thread.start()
    slowest = 0.0
    while any(t.is_alive() for t in threads):
        started = time.perf_counter()
        assert client.get("/healthz").status_code == 200
        slowest = max(slowest, time.perf_counter() - started)
        time.sleep(0.01)
    for thread in threads:
        thread.join()
    return results, slowest


# --- lists of prompts ---------------------------------------------------------------------


def test_every_prompt_of_a_list_is_reserved(
    client: TestClient, counters: dict[VersionKey, TokenCounter]
) -> None:
    answer = client.post("/weir/admin/keys", json={"name": "t", "tpm": 2000}, headers=bearer(ADMIN))
    key = bearer(str(answer.json()["key"]))
    body = {"model": "smollm2", "prompt": ["hi"] * 100, "max_tokens": 100}
    error = refused(client.post("/v1/completions", json=body, headers=key), None, 429)
    needed = sum(counters[SMOLLM2].count_texts(["hi"] * 100)) + 100 * 100
    assert f"needs {needed} tokens" in error["message"]
    few = {"model": "smollm2", "prompt": ["hi"] * 5, "max_tokens": 100, "n": 2}
    admitted = client.post("/v1/completions", json=few, headers=key)
    assert admitted.status_code == 200, admitted.text
    reserved = 5 + 5 * 100 * 2
    assert int(admitted.headers["x-ratelimit-remaining-tokens"]) <= 2000 - reserved


@pytest.mark.parametrize(
    "prompt", [["hi"] * (MAX_PROMPTS + 1), [[1, 2]] * (MAX_PROMPTS + 1), ["x"] * 150_000]
)
def test_prompt_lists_are_bounded(
    client: TestClient, auth: dict[str, str], engine: FakeEngine, prompt: list[Any]
) -> None:
    started = time.perf_counter()
    answer = client.post(
        "/v1/completions", json={"model": "smollm2", "prompt": prompt}, headers=auth
    )
    error = refused(answer, "prompt")
    assert f"at most {MAX_PROMPTS}" in error["message"]
    assert time.perf_counter() - started < 2.0
    assert engine.calls == []


# --- huge prompts -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": WORDS}]}, "messages"),
        ("/v1/completions", {"prompt": WORDS}, "prompt"),
    ],
)
def test_huge_prompts_are_refused_without_stalling_the_gateway(
    client: TestClient, auth: dict[str, str], path: str, body: dict[str, Any], param: str
) -> None:
    payload = {"model": "smollm2", **body}

    def post() -> tuple[Any, float]:
        started = time.perf_counter()
        answer = client.post(path, json=payload, headers=auth)
        return answer, time.perf_counter() - started

    results, slowest_health = while_probing(client, [post] * 4)
    for answer, took in results:
        error = refused(answer, param)
        assert error["code"] == "context_length_exceeded"
        assert "characters" in error["message"]
        assert took < 2.0  # counting these took about 3 s each, one after the other
    assert slowest_health < 0.5


def test_the_char_bound_is_sound(counters: dict[VersionKey, TokenCounter]) -> None:
    """No text of ``max_chars`` characters or fewer is refused for its length: the longest
    vocabulary entries repeated are the densest text there is, and still fit."""
    counter = counters[SMOLLM2]
    assert counter.max_chars is not None
    assert counters[MINILM].max_chars is None  # WordPiece: one [UNK] for any long word
    vocab = counter.tokenizer.get_vocab(with_added_tokens=True)
    longest = max(vocab, key=len)
    dense = counter.tokenizer.decode([vocab[longest]]) * (counter.context - 1)
    assert len(dense) <= counter.max_chars
    assert counter.count_text(dense) <= counter.context


def test_long_embedding_inputs_do_not_stall_the_gateway(
    client: TestClient, auth: dict[str, str]
) -> None:
    # MiniLM's tokenizer gives no bound by length: the input is counted, in a thread
    body = {"model": "minilm", "input": "word " * (HUGE // 5)}

    def post() -> Any:
        return client.post("/v1/embeddings", json=body, headers=auth)

    results, slowest_health = while_probing(client, [post] * 2)
    for answer in results:
        assert refused(answer, "input")["code"] == "context_length_exceeded"
    assert slowest_health < 0.5


@pytest.mark.anyio
async def test_counting_leaves_the_event_loop_free(
    counters: dict[VersionKey, TokenCounter],
) -> None:
    from serving.protocol.requests import CompletionRequest, EmbeddingRequest

    config = ContractConfig()
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticking = asyncio.create_task(ticker())
    await asyncio.sleep(0.02)
    smollm2, minilm = counters[SMOLLM2], counters[MINILM]
    assert smollm2.max_chars is not None
    near_the_bound = "word " * (smollm2.max_chars // 5)  # tokenized: about 0.1 s of work
    completion = CompletionRequest(model="smollm2", prompt=near_the_bound)
    embedding = EmbeddingRequest(model="minilm", input="word " * (HUGE // 5))
    from serving.errors import ContextLengthExceeded

    for prepare, request, counter in (
        (contract.prepare_completion, completion, smollm2),
        (contract.prepare_embeddings, embedding, minilm),
    ):
        with pytest.raises(ContextLengthExceeded):
            await contract.prepare_async(prepare, request, counter, config)  # type: ignore[arg-type]
    stop.set()
    await ticking
    assert max(gaps) < 0.1, max(gaps)


# --- free-form JSON, logit_bias, stop -----------------------------------------------------


def nested(levels: int) -> Any:
    value: Any = "x"
    for _ in range(levels):
        value = {"a": value}
    return value


@pytest.mark.parametrize("levels", [MAX_JSON_DEPTH + 1, 190])  # 190: under the parser's limit
def test_deep_unknown_fields_are_refused_by_name(
    client: TestClient, auth: dict[str, str], engine: FakeEngine, levels: int
) -> None:
    message = {"role": "user", "content": "Hi", "frobnicate": nested(levels)}
    answer = client.post("/v1/chat/completions", json=CHAT | {"messages": [message]}, headers=auth)
    error = refused(answer, "messages[0]")
    assert "'frobnicate'" in error["message"]
    top = client.post(
        "/v1/chat/completions", json=CHAT | {"extra_thing": nested(levels)}, headers=auth
    )
    assert "'extra_thing'" in refused(top, None)["message"]
    calls = client.post(
        "/v1/chat/completions",
        json=CHAT | {"messages": [{"role": "assistant", "tool_calls": [nested(levels)]}]},
        headers=auth,
    )
    assert refused(calls, None)["param"].startswith("messages[0].tool_calls")
    assert engine.calls == []


def test_shallow_unknown_fields_pass(
    client: TestClient, auth: dict[str, str], engine: FakeEngine
) -> None:
    message = {"role": "user", "content": "Hi", "frobnicate": nested(MAX_JSON_DEPTH)}
    answer = client.post("/v1/chat/completions", json=CHAT | {"messages": [message]}, headers=auth)
    assert answer.status_code == 200, answer.text
    assert engine.calls[-1]["messages"][0]["frobnicate"] == nested(MAX_JSON_DEPTH)


def test_logit_bias_is_bounded(
    client: TestClient, auth: dict[str, str], engine: FakeEngine
) -> None:
    huge = {str(i): 1 for i in range(100_000)}
    refused(
        client.post("/v1/chat/completions", json=CHAT | {"logit_bias": huge}, headers=auth),
        "logit_bias",
    )
    for bad in ({"50256": 101}, {"50256": -100.5}, {"not-a-token": 1}):
        answer = client.post("/v1/chat/completions", json=CHAT | {"logit_bias": bad}, headers=auth)
        assert refused(answer, None)["param"].startswith("logit_bias")
    assert engine.calls == []
    most = {str(i): -100 for i in range(MAX_LOGIT_BIAS)}
    answer = client.post(
        "/v1/completions",
        json={"model": "smollm2", "prompt": "Hi", "logit_bias": most},
        headers=auth,
    )
    assert answer.status_code == 200, answer.text
    assert len(engine.calls[-1]["logit_bias"]) == MAX_LOGIT_BIAS


def test_stop_is_bounded(client: TestClient, auth: dict[str, str], engine: FakeEngine) -> None:
    for stop in ("x" * 3_000_000, ["x" * 1_000_000] * 3, ["a", "b", "c", "d", "e"]):
        answer = client.post("/v1/chat/completions", json=CHAT | {"stop": stop}, headers=auth)
        assert refused(answer, None)["param"].startswith("stop")
    assert engine.calls == []
    fine = ["x" * 1024] * 4
    assert (
        client.post("/v1/chat/completions", json=CHAT | {"stop": fine}, headers=auth).status_code
        == 200
    )
