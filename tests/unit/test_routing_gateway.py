"""Routing at the gateway with fake replicas: retries, breakers, TTFT, fallbacks, overload."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import orjson
import pytest
from starlette.testclient import TestClient

from models.config import ModelConfig, RoutingConfig, TimeoutConfig, VersionConfig
from models.engines.fleet import Fleet, Replica
from models.errors import EngineFailed, EngineRejected, EngineUnavailable
from models.types import ReplicaKey
from serving.http.app import create_app
from serving.routing.dispatch import Dispatcher
from serving.settings import Settings
from tests.fakes.engine import FakeEngine

CHAT: dict[str, Any] = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}
FAST = RoutingConfig(breaker_failures=3, breaker_open_s=60, backoff_base_s=0, retries=2)


def settings(
    versions: dict[str, int],
    routing: RoutingConfig = FAST,
    fallbacks: list[str] | None = None,
    timeouts: TimeoutConfig | None = None,
) -> Settings:
    chat = ModelConfig(
        name="smollm2",
        task="chat",
        current=next(iter(versions)),
        versions=[
            VersionConfig(version=v, url="http://unused", replicas=n) for v, n in versions.items()
        ],
        fallbacks=fallbacks or [],
        routing=routing,
        timeouts=timeouts or TimeoutConfig(),
    )
    embed = ModelConfig(
        name="minilm", task="embed", current="l6", versions=[VersionConfig(version="l6", url="x")]
    )
    return Settings(models=[chat, embed])


def client_for(config: Settings, engines: dict[str, FakeEngine]) -> TestClient:
    """``engines`` by replica key (``smollm2@v1#0``); missing ones get a healthy fake."""

    def fleet(_: object) -> Fleet:
        replicas = []
        for model in config.models:
            for version in model.versions:
                for index in range(version.replicas):
                    key = ReplicaKey(model.name, version.version, index)
                    engine = engines.setdefault(str(key), FakeEngine(name=str(key)))
                    replicas.append(Replica(key, engine, model.name))
        return Fleet(replicas, health_interval_s=0.05)

    return TestClient(create_app(config, fleet_factory=fleet, counters={}))


def breaker_state(client: TestClient, key: str) -> str:
    dispatcher: Dispatcher = client.app.state.proxy.dispatcher  # type: ignore[attr-defined]
    replica = next(r for r in dispatcher.fleet.replicas if str(r.key) == key)
    return dispatcher.load_of(replica).breaker.state


def test_engine_faults_are_retried_on_another_replica_and_trip_the_breaker() -> None:
    broken = FakeEngine(fail_with=EngineUnavailable("connection refused"))
    engines = {"smollm2@v1#0": broken}
    with client_for(settings({"v1": 2}), engines) as client:
        answers = [client.post("/v1/chat/completions", json=CHAT) for _ in range(20)]
        assert all(a.status_code == 200 for a in answers)
        assert breaker_state(client, "smollm2@v1#0") == "open"
    assert len(broken.calls) == 3  # three faults opened it; nothing was sent after
    assert len(engines["smollm2@v1#1"].calls) == 20


def test_client_errors_are_not_faults_and_not_retried() -> None:
    rejecting = FakeEngine(fail_with=EngineRejected("bad logit_bias", status=400))
    engines = {"smollm2@v1#0": rejecting}
    with client_for(settings({"v1": 1}), engines) as client:
        for _ in range(5):
            assert client.post("/v1/chat/completions", json=CHAT).status_code == 400
        assert breaker_state(client, "smollm2@v1#0") == "closed"
    assert len(rejecting.calls) == 5


def test_a_single_replica_failing_opens_its_breaker_then_fails_fast() -> None:
    broken = FakeEngine(fail_with=EngineFailed("500 from engine"))
    with client_for(settings({"v1": 1}), {"smollm2@v1#0": broken}) as client:
        first = client.post("/v1/chat/completions", json=CHAT)
        assert first.status_code == 502
        assert len(broken.calls) == 3  # the first try and two retries, all faults
        after = client.post("/v1/chat/completions", json=CHAT)
        assert after.status_code == 503
        assert after.json()["error"]["code"] == "engine_unavailable"
        assert "open circuit" in after.json()["error"]["message"]
        assert "retry-after" in after.headers
    assert len(broken.calls) == 3


def test_slow_first_token_times_out_is_retried_then_trips_the_breaker() -> None:
    slow = FakeEngine(first_chunk_delay_s=30)
    timeouts = TimeoutConfig(ttft_s=0.1)
    engines = {"smollm2@v1#0": slow}
    with client_for(settings({"v1": 2}, timeouts=timeouts), engines) as client:
        for _ in range(6):
            answer = client.post("/v1/chat/completions", json=CHAT | {"stream": True})
            assert answer.status_code == 200
            assert answer.text.rstrip().endswith("data: [DONE]")
            assert "error" not in answer.text
        assert breaker_state(client, "smollm2@v1#0") == "open"
    assert slow.cancelled == 3  # each timed-out attempt was cancelled at the engine
    alone = {"smollm2@v1#0": FakeEngine(first_chunk_delay_s=30)}
    with client_for(settings({"v1": 1}, timeouts=timeouts), alone) as client:
        started = time.monotonic()
        answer = client.post("/v1/chat/completions", json=CHAT | {"stream": True})
        # a time on purpose: the 0.1 s first-token timeout, not the engine's 30 s delay
        assert time.monotonic() - started < 2
        assert answer.status_code == 504
        assert "no first token within 0.1s" in answer.json()["error"]["message"]


def test_a_stream_that_started_is_never_retried() -> None:
    dying = FakeEngine(die_after=1)
    engines = {"smollm2@v1#0": dying, "smollm2@v1#1": FakeEngine(die_after=1)}
    with client_for(settings({"v1": 2}), engines) as client:
        answer = client.post("/v1/chat/completions", json=CHAT | {"stream": True})
    lines = [line for line in answer.text.splitlines() if line.startswith("data: ")]
    assert orjson.loads(lines[-2][6:])["error"]["code"] == "engine_error"
    assert lines[-1] == "data: [DONE]"
    assert len(dying.calls) + len(engines["smollm2@v1#1"].calls) == 1


def test_fallback_when_every_replica_is_out() -> None:
    engines = {"smollm2@v1#0": FakeEngine(fail_with=EngineUnavailable("down"))}
    config = settings({"v1": 1, "v2": 1}, fallbacks=["smollm2@v2"])
    with client_for(config, engines) as client:
        failing = client.post("/v1/chat/completions", json=CHAT)
        assert failing.status_code == 503  # the breaker was closed: v1 was tried (3 times)
        moved = client.post("/v1/chat/completions", json=CHAT)
        assert moved.status_code == 200
        assert moved.headers["x-weir-fallback"] == "smollm2@v2"
        assert moved.headers["x-weir-model-version"] == "v2"
        assert moved.json()["model"] == "smollm2"
        pinned = client.post("/v1/chat/completions", json=CHAT | {"model": "smollm2@v2"})
        assert "x-weir-fallback" not in pinned.headers


@pytest.mark.anyio
async def test_overload_is_refused_at_once_and_other_models_are_untouched() -> None:
    routing = RoutingConfig(max_in_flight=2, max_queue=2, queue_timeout_s=5)
    config = settings({"v1": 1}, routing=routing)
    engines = {"smollm2@v1#0": FakeEngine(hang_s=1.0)}

    def fleet(_: object) -> Fleet:
        return Fleet(
            [
                Replica(ReplicaKey("smollm2", "v1", 0), engines["smollm2@v1#0"], "smollm2"),
                Replica(ReplicaKey("minilm", "l6", 0), FakeEngine(), "minilm"),
            ],
            health_interval_s=0.05,
        )

    app = create_app(config, fleet_factory=fleet, counters={})
    async with app.router.lifespan_context(app):
        dispatcher: Dispatcher = app.state.proxy.dispatcher
        for _ in range(1000):  # polled until the first health round has marked them
            if all(r.healthy for r in dispatcher.fleet.replicas):
                break
            await asyncio.sleep(0.01)
        assert all(r.healthy for r in dispatcher.fleet.replicas)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:

            async def timed(path: str, body: dict[str, Any]) -> tuple[int, float, httpx.Response]:
                answer = await client.post(path, json=body)
                return answer.status_code, time.monotonic(), answer  # when it ended

            chats = [timed("/v1/chat/completions", CHAT) for _ in range(10)]
            embed = timed("/v1/embeddings", {"model": "minilm", "input": "x"})
            results = await asyncio.gather(*chats, embed)
    statuses = sorted(r[0] for r in results[:10])
    assert statuses == [200] * 4 + [503] * 6  # 2 in flight, 2 queued, the rest refused
    refused = [r for r in results[:10] if r[0] == 503]
    # at once: every refusal ended before any answer, each of which waited the engine's
    # full second (a sleep never ends early), whatever the host's speed
    first_answer = min(r[1] for r in results[:10] if r[0] == 200)
    assert all(r[1] < first_answer for r in refused)
    assert all(r[2].json()["error"]["code"] == "engine_overloaded" for r in refused)
    assert all(r[2].headers["retry-after"] == "1" for r in refused)
    assert results[10][0] == 200
    assert results[10][1] < first_answer  # the embedding model did not wait on the chat model
