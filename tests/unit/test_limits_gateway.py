"""Limits at the gateway (fake engine, in-process store): 429s, headers, and no leaks."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import SecretStr
from starlette.testclient import TestClient
from starlette.types import Message

from models.engines.fleet import Fleet, Replica
from models.errors import EngineFailed
from models.types import ReplicaKey
from serving.http.app import Gateway, create_app
from serving.limits.limiter import Limiter
from serving.settings import KeysConfig, LimitsConfig, Settings
from tests.asgi import body_then_leave, post_scope
from tests.fakes.engine import FakeEngine
from tests.openai_spec import validate
from tests.windows import hold_limit_window

ADMIN = "admin-secret-for-limit-tests"
CHAT: dict[str, Any] = {
    "model": "smollm2",
    "messages": [{"role": "user", "content": "Hi"}],
    "max_tokens": 20,
}
RATE_HEADERS = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
)


def make_app(engine: FakeEngine, tmp_path: Path, limits: LimitsConfig | None = None) -> Gateway:
    def fleet(_: object) -> Fleet:
        replica = Replica(ReplicaKey("smollm2", "135m-instruct", 0), engine, "smollm2")
        return Fleet([replica], health_interval_s=0.05)

    keys = KeysConfig(enabled=True, file=tmp_path / "keys.json", admin_key=SecretStr(ADMIN))
    settings = Settings(keys=keys, limits=limits or LimitsConfig())
    return create_app(settings, fleet_factory=fleet, counters={})


def bearer(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


def new_key(client: TestClient, **limits: int) -> str:
    answer = client.post(
        "/weir/admin/keys", json={"name": "t", **limits}, headers=bearer(ADMIN)
    ).json()
    return str(answer["key"])


def outstanding(client: TestClient) -> dict[str, int]:
    limiter: Limiter = client.app.state.limiter  # type: ignore[attr-defined]
    client.portal.call(limiter.drain)  # type: ignore[union-attr]
    view = client.get("/weir/admin/limits", headers=bearer(ADMIN)).json()
    return dict(view["outstanding"])


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(engine: FakeEngine, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(make_app(engine, tmp_path), raise_server_exceptions=False) as made:
        hold_limit_window(made.app)  # its minute never ends under a test
        yield made


def test_requests_per_minute_gives_429_with_headers(client: TestClient) -> None:
    secret = new_key(client, rpm=2, tpm=1000)
    answers = [
        client.post("/v1/chat/completions", json=CHAT, headers=bearer(secret)) for _ in range(3)
    ]
    assert [a.status_code for a in answers] == [200, 200, 429]
    for answer in answers:
        assert all(h in answer.headers for h in RATE_HEADERS), answer.headers
    assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == ["1", "0", "0"]
    refused = answers[2]
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert "requests per minute" in refused.json()["error"]["message"]
    validate("ErrorResponse", refused.json())
    # tokens: reserved 20 each, settled to the 8 the engine used
    assert answers[1].headers["x-ratelimit-remaining-tokens"] == str(1000 - 8 - 20)
    assert outstanding(client) == {"reservations": 0, "tokens": 0}


def test_a_request_bigger_than_the_token_limit_says_so(client: TestClient) -> None:
    secret = new_key(client, tpm=100)
    refused = client.post(
        "/v1/chat/completions", json=CHAT | {"max_tokens": 500}, headers=bearer(secret)
    )
    assert refused.status_code == 429
    assert "Lower max_tokens" in refused.json()["error"]["message"]


def test_streams_settle_to_usage_and_hide_it_unless_asked(client: TestClient) -> None:
    secret = new_key(client, tpm=1000)
    with client.stream(
        "POST", "/v1/chat/completions", json=CHAT | {"stream": True}, headers=bearer(secret)
    ) as plain:
        events = [line for line in plain.iter_lines() if line.startswith("data: {")]
    assert not any('"usage"' in e for e in events)
    asked = CHAT | {"stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=asked, headers=bearer(secret)) as s:
        chunks = [orjson.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert chunks[-1]["usage"]["total_tokens"] == 8
    assert outstanding(client) == {"reservations": 0, "tokens": 0}
    after = client.post("/v1/chat/completions", json=CHAT, headers=bearer(secret))
    assert after.headers["x-ratelimit-remaining-tokens"] == str(1000 - 8 * 2 - 20)


def test_failures_release_their_reservation(engine: FakeEngine, client: TestClient) -> None:
    secret = new_key(client, tpm=1000, max_concurrency=1)
    engine.fail_with = EngineFailed("boom")
    assert client.post("/v1/chat/completions", json=CHAT, headers=bearer(secret)).status_code == 502
    engine.fail_with = None
    engine.die_after = 1
    with client.stream(
        "POST", "/v1/chat/completions", json=CHAT | {"stream": True}, headers=bearer(secret)
    ) as broken:
        assert "engine_error" in "".join(broken.iter_lines())
    assert outstanding(client) == {"reservations": 0, "tokens": 0}
    engine.die_after = None
    ok = client.post("/v1/chat/completions", json=CHAT, headers=bearer(secret))
    assert ok.status_code == 200  # the concurrency slot came back too
    assert ok.headers["x-ratelimit-remaining-tokens"] == str(1000 - 20)


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [False, True])
async def test_client_disconnect_releases(tmp_path: Path, stream: bool) -> None:
    engine = FakeEngine(hang_s=30) if not stream else FakeEngine(first_chunk_delay_s=30)
    app = make_app(engine, tmp_path, LimitsConfig(model_tpm={"smollm2": 1000}))
    raw = orjson.dumps(CHAT | {"stream": stream})
    scope = post_scope("/v1/chat/completions", raw)
    receive = body_then_leave(raw, lambda: asyncio.sleep(0.2))

    async def send(message: Message) -> None:
        return None

    async with app.router.lifespan_context(app):
        limiter: Limiter = app.state.limiter
        scope["headers"].append((b"authorization", f"Bearer {await _key(app)}".encode()))
        await asyncio.wait_for(app(scope, receive, send), timeout=5)
        await limiter.drain()
        left = await limiter.store.outstanding()
    assert engine.cancelled == 1
    assert (left.reservations, left.tokens) == (0, 0)


async def _key(app: Gateway) -> str:
    from serving.keys.issue import KeyCreate, create_key

    secret, _ = await create_key(app.state.key_store, KeyCreate(name="d", tpm=1000))
    return secret


def test_model_budget_is_changed_at_runtime(client: TestClient) -> None:
    secret = new_key(client)
    put = client.put("/weir/admin/limits/models/smollm2", json={"tpm": 25}, headers=bearer(ADMIN))
    assert put.status_code == 200
    assert client.post("/v1/chat/completions", json=CHAT, headers=bearer(secret)).status_code == 200
    refused = client.post("/v1/chat/completions", json=CHAT, headers=bearer(secret))
    assert refused.status_code == 429
    assert "for this model" in refused.json()["error"]["message"]
    view = client.get("/weir/admin/limits", headers=bearer(ADMIN)).json()
    assert view["models"]["smollm2"]["runtime_tpm"] == 25
    client.put("/weir/admin/limits/models/smollm2", json={"tpm": None}, headers=bearer(ADMIN))
    assert client.post("/v1/chat/completions", json=CHAT, headers=bearer(secret)).status_code == 200
    bad = client.put("/weir/admin/limits/models/smollm2", json={"tpm": -1}, headers=bearer(ADMIN))
    assert bad.status_code == 400
