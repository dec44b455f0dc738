"""Fuzz the gateway: whatever the body, no 5xx and every answer matches its schema.

Bodies are drawn by Hypothesis: arbitrary JSON, and chat/completion/embedding bodies
whose fields take arbitrary JSON values (wrong types, huge numbers, nulls, nesting).
The engine is the in-process fake, so every failure found is the gateway's own.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from tests.fakes.engine import FakeEngine
from tests.openai_spec import validate
from tests.unit.test_gateway import make_client

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
ROUTES = {
    "/v1/chat/completions": plausible(CHAT, ("model", "messages")) | hostile(tuple(CHAT)),
    "/v1/completions": plausible(COMPLETION, ("model", "prompt")) | hostile(tuple(COMPLETION)),
    "/v1/embeddings": plausible(EMBEDDING, ("model", "input")) | hostile(tuple(EMBEDDING)),
}
SUCCESS_SCHEMA = {
    "/v1/chat/completions": "CreateChatCompletionResponse",
    "/v1/completions": "CreateCompletionResponse",
    "/v1/embeddings": "CreateEmbeddingResponse",
}
SEEN: dict[int, int] = {}


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with make_client(FakeEngine(content='{"city": "Paris"}')) as c:
        yield c


def check(client: TestClient, route: str, raw: bytes) -> None:
    response = client.post(route, content=raw, headers={"content-type": "application/json"})
    SEEN[response.status_code] = SEEN.get(response.status_code, 0) + 1
    # 502 invalid_model_output is the contract working: the fake's answer broke the schema
    allowed_5xx = response.status_code == 502 and "invalid_model_output" in response.text
    assert response.status_code < 500 or allowed_5xx, response.text
    if response.status_code >= 400:
        validate("ErrorResponse", response.json())
    elif response.headers["content-type"].startswith("text/event-stream"):
        events = [e[6:] for e in response.text.split("\n\n") if e.startswith("data: ")]
        assert events[-1] == "[DONE]"
    else:
        validate(SUCCESS_SCHEMA[route], response.json())


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(route=st.sampled_from(sorted(ROUTES)), data=st.data())
def test_structured_bodies(client: TestClient, route: str, data: st.DataObject) -> None:
    body: Any = data.draw(ROUTES[route])
    check(client, route, json.dumps(body).encode())


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    route=st.sampled_from(sorted(ROUTES)),
    raw=st.binary(max_size=64) | JSON_VALUE.map(lambda v: json.dumps(v).encode()),
)
def test_arbitrary_bytes(client: TestClient, route: str, raw: bytes) -> None:
    check(client, route, raw)


def test_zz_report(capsys: pytest.CaptureFixture[str]) -> None:
    """Prints what the fuzz tests saw (run with -s); fails if they saw nothing."""
    assert sum(SEEN.values()) >= 600
    with capsys.disabled():
        print(f"\nfuzz outcomes by status: {dict(sorted(SEEN.items()))}")
