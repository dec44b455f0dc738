"""Fuzz the gateway: whatever the body, no 5xx, every answer and every stream event matches
its schema, and a stream never ends in an error the gateway made itself.

Bodies are drawn by Hypothesis: valid bodies with values across their ranges, bodies whose
every field has the right type with values anywhere in (and past) range, bodies with the
right field names and any JSON at all as values, and arbitrary bytes. The engine is the
in-process fake, so every failure found is the gateway's own; prompts are counted and
templated by the real SmolLM2 and MiniLM tokenizers. Each test is self-contained (it
counts its own outcomes, in any order, alone or with ``-k``), and reproducible: the
plain fuzz bypasses the response cache, and the cache fuzz starts every example with a
new gateway (empty cache), so a failing example replays alone.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from models.config import StoreConfig
from models.store import ModelStore
from models.tokenizer import TokenCounter
from models.types import VersionKey
from tests.fakes.engine import FakeEngine
from tests.openai_spec import validate
from tests.unit.test_gateway import make_client, smollm2_counter

JSON_LEAF = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
JSON_VALUE = st.recursive(
    JSON_LEAF,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
SCHEMA = st.sampled_from(
    [{"type": "object"}, {"type": "object", "required": ["x"]}, {"type": 5}, {"minimum": "a"}]
)
ROLES = st.sampled_from(["user", "system", "assistant", "tool", "developer", "wizard"])
MODELS = st.sampled_from(["smollm2", "smollm2@135m-instruct", "minilm", "nope"])
TEXT = st.text(min_size=1, max_size=40)


def plausible(strategy_of: dict[str, st.SearchStrategy[Any]], required: tuple[str, ...]) -> Any:
    """Bodies whose every field has the right type, with values anywhere in (and past) range."""
    return st.fixed_dictionaries(
        {k: v for k, v in strategy_of.items() if k in required},
        optional={k: v for k, v in strategy_of.items() if k not in required},
    )


def hostile(fields: tuple[str, ...]) -> Any:
    """Bodies with the right field names and any JSON at all as values."""
    return st.fixed_dictionaries({}, optional={f: JSON_VALUE for f in fields})


SAMPLING = {
    "model": MODELS,
    "max_tokens": st.integers(-1, 5000),
    "temperature": st.floats(-1, 3),
    "top_p": st.floats(0, 1.5),
    "n": st.integers(0, 10),
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=5),
    "seed": st.integers(),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "user": st.text(max_size=10),
    "frobnicate": JSON_VALUE,
}
CHAT = SAMPLING | {
    "messages": st.lists(
        st.fixed_dictionaries(
            {"role": ROLES},
            optional={"content": st.text(max_size=50) | st.just([{"type": "text", "text": "x"}])},
        ),
        max_size=4,
    ),
    "logprobs": st.booleans(),
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}, {"type": "x"}])
    | SCHEMA.map(lambda s: {"type": "json_schema", "json_schema": {"name": "s", "schema": s}}),
}
COMPLETION = SAMPLING | {
    "prompt": st.text(max_size=30) | st.lists(st.integers(0, 50000), max_size=5)
}
EMBEDDING = {
    "model": MODELS,
    "input": st.text(max_size=30) | st.lists(st.text(max_size=10), max_size=5),
    "encoding_format": st.sampled_from(["float", "base64", "hex"]),
}
# Valid bodies, values across their ranges: what a client that follows the spec sends.
VALID_SAMPLING = {
    "max_tokens": st.integers(1, 64),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "seed": st.integers(0, 2**31),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "stop": st.lists(TEXT, max_size=4),
    "user": st.text(max_size=10),
}
VALID = {
    "/v1/chat/completions": st.fixed_dictionaries(
        {
            "model": st.sampled_from(["smollm2", "smollm2@135m-instruct"]),
            "messages": st.lists(
                st.fixed_dictionaries(
                    {
                        "role": st.sampled_from(["user", "system", "assistant", "developer"]),
                        "content": TEXT,
                    }
                ),
                min_size=1,
                max_size=4,
            ),
        },
        optional=VALID_SAMPLING,
    ),
    "/v1/completions": st.fixed_dictionaries(
        {"model": st.just("smollm2"), "prompt": TEXT | st.lists(TEXT, min_size=1, max_size=3)},
        optional=VALID_SAMPLING,
    ),
    "/v1/embeddings": st.fixed_dictionaries(
        {"model": st.just("minilm"), "input": TEXT | st.lists(TEXT, min_size=1, max_size=5)},
        optional={"encoding_format": st.just("float")},
    ),
}
ROUTES = {
    "/v1/chat/completions": plausible(CHAT, ("model", "messages")) | hostile(tuple(CHAT)),
    "/v1/completions": plausible(COMPLETION, ("model", "prompt")) | hostile(tuple(COMPLETION)),
    "/v1/embeddings": plausible(EMBEDDING, ("model", "input")) | hostile(tuple(EMBEDDING)),
}
ANSWER_SCHEMA = {
    "/v1/chat/completions": "CreateChatCompletionResponse",
    "/v1/completions": "CreateCompletionResponse",
    "/v1/embeddings": "CreateEmbeddingResponse",
}
CHUNK_SCHEMA = {
    "/v1/chat/completions": "CreateChatCompletionStreamResponse",
    "/v1/completions": "CompletionStreamChunk",  # see tests/openai_spec.py
}
BYPASS = {"x-weir-cache-control": "bypass"}


def counters() -> dict[VersionKey, TokenCounter]:
    embed = TokenCounter.from_dir(ModelStore(StoreConfig().root).resolve("all-minilm-l6-v2"))
    return {
        VersionKey("smollm2", "135m-instruct"): smollm2_counter(),
        VersionKey("minilm", "l6-v2"): embed,
    }


def gateway() -> TestClient:
    return make_client(FakeEngine(content='{"city": "Paris"}'), counters=COUNTERS)


COUNTERS: dict[VersionKey, TokenCounter] = {}


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    COUNTERS.update(counters())  # loaded once for the module; read-only afterwards
    with gateway() as c:
        yield c


def check(client: TestClient, route: str, raw: bytes, headers: dict[str, str]) -> Any:
    """Send ``raw`` and assert the answer is sound; its status and what it said (the text
    of each choice and how it finished, or the vectors), whether streamed or not."""
    response = client.post(
        route, content=raw, headers={"content-type": "application/json"} | headers
    )
    # 502 invalid_model_output is the contract working: the fake's answer broke the schema
    allowed_5xx = response.status_code == 502 and "invalid_model_output" in response.text
    assert response.status_code < 500 or allowed_5xx, response.text
    if response.status_code >= 400:
        validate("ErrorResponse", response.json())
        return response.status_code, response.json()["error"]["code"]
    if response.headers["content-type"].startswith("text/event-stream"):
        events = [e[6:] for e in response.text.split("\n\n") if e.startswith("data: ")]
        assert events[-1] == "[DONE]"
        said: dict[int, list[Any]] = {}
        for event in events[:-1]:
            chunk = orjson.loads(event)
            assert "error" not in chunk, chunk  # a 200 stream that failed in the gateway
            validate(CHUNK_SCHEMA[route], chunk)
            for choice in chunk["choices"]:
                text = (choice.get("delta") or {}).get("content") or choice.get("text") or ""
                into = said.setdefault(choice["index"], ["", None])
                into[0] += text
                into[1] = choice.get("finish_reason") or into[1]
        return 200, sorted((i, *v) for i, v in said.items())
    answer = response.json()
    validate(ANSWER_SCHEMA[route], answer)
    if route == "/v1/embeddings":
        return 200, [d["embedding"] for d in answer["data"]]
    return 200, sorted(
        (c["index"], (c.get("message") or {}).get("content") or c.get("text") or "",
         c["finish_reason"])
        for c in answer["choices"]
    )  # fmt: skip


def fuzz(examples: int, strategy: Any, send: Any) -> Counter[int]:
    """Run ``send`` on ``examples`` drawn bodies; the statuses seen."""
    seen: Counter[int] = Counter()

    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(drawn=strategy)
    def run(drawn: Any) -> None:
        seen[send(*drawn)] += 1

    run()
    return seen


def share_ok(seen: Counter[int]) -> float:
    return seen[200] / max(sum(seen.values()), 1)


BODIES = st.sampled_from(sorted(ROUTES)).flatmap(
    lambda route: st.tuples(st.just(route), VALID[route] | ROUTES[route])
)


def test_structured_bodies(client: TestClient) -> None:
    def send(route: str, body: Any) -> int:
        status, _ = check(client, route, json.dumps(body).encode(), BYPASS)
        return int(status)

    seen = fuzz(400, BODIES, send)
    print(f"\nstructured bodies, outcomes by status: {dict(sorted(seen.items()))}")
    assert share_ok(seen) >= 0.2, seen  # the fuzz reaches the engine, not only the checks


def test_arbitrary_bytes(client: TestClient) -> None:
    raw = st.binary(max_size=64) | JSON_VALUE.map(lambda v: json.dumps(v).encode())

    def send(route: str, body: bytes) -> int:
        status, _ = check(client, route, body, BYPASS)
        return int(status)

    seen = fuzz(200, st.tuples(st.sampled_from(sorted(ROUTES)), raw), send)
    assert sum(seen.values()) == 200
    assert seen[200] + seen[400] + seen[404] == 200, seen  # refused clearly, or answered


def deterministic_body(body: Any) -> Any:
    return {**body, "temperature": 0}


def test_a_cache_hit_answers_as_the_miss_did() -> None:
    """Deterministic valid bodies, each sent twice to a new gateway: the second is a hit
    (non-embedding routes) with the same status and the same choices, in the route's shape."""
    COUNTERS.update(counters())

    def at_zero(route: str) -> Any:
        if route == "/v1/embeddings":
            return st.tuples(st.just(route), VALID[route])
        return st.tuples(st.just(route), VALID[route].map(deterministic_body))

    deterministic = st.sampled_from(sorted(VALID)).flatmap(at_zero)

    def send(route: str, body: Any) -> int:
        with gateway() as fresh:
            raw = json.dumps(body).encode()
            first = check(fresh, route, raw, {})
            cache = fresh.app.state.proxy.cache  # type: ignore[attr-defined]
            fresh.portal.call(cache.drain)  # type: ignore[union-attr]
            second = check(fresh, route, raw, {})
        assert second == first
        return int(first[0])

    seen = fuzz(60, deterministic, send)
    assert share_ok(seen) >= 0.9, seen
