"""Metrics, traces and the request log line, with the gateway in-process."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import SecretStr
from starlette.testclient import TestClient

from models.engines.client import EngineTimeouts, HttpEngine
from models.engines.fleet import Fleet, Replica
from models.errors import EngineFailed
from models.types import ReplicaKey
from serving.http.app import create_app
from serving.observe import metrics as ours
from serving.settings import KeysConfig, Settings
from tests.fakes.engine import FakeEngine
from tests.windows import hold_limit_window

CHAT: dict[str, Any] = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}
ADMIN = "admin-for-observability"


def fleet_of(chat: Any) -> Any:
    def fleet(_: object) -> Fleet:
        return Fleet(
            [
                Replica(ReplicaKey("smollm2", "135m-instruct", 0), chat, "smollm2"),
                Replica(ReplicaKey("minilm", "l6-v2", 0), FakeEngine(), "minilm"),
            ],
            health_interval_s=0.05,
        )

    return fleet


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one series in Prometheus text output (0 if absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(engine: FakeEngine, tmp_path: Path) -> Iterator[TestClient]:
    keys = KeysConfig(enabled=True, file=tmp_path / "keys.json", admin_key=SecretStr(ADMIN))
    app = create_app(Settings(keys=keys), fleet_factory=fleet_of(engine), counters={})
    with TestClient(app, raise_server_exceptions=False) as made:
        hold_limit_window(made.app)  # rpm=3 then a 429: one minute throughout
        yield made


def key(client: TestClient, **limits: int) -> dict[str, str]:
    made = client.post(
        "/weir/admin/keys",
        json={"name": "o", **limits},
        headers={"authorization": f"Bearer {ADMIN}"},
    ).json()
    return {"authorization": f"Bearer {made['key']}"}


def test_buckets_are_vllms() -> None:
    from vllm.v1.metrics import buckets

    assert tuple(buckets.TIME_TO_FIRST_TOKEN_BUCKETS) == ours.TTFT_BUCKETS
    assert tuple(buckets.INTER_TOKEN_LATENCY_BUCKETS) == ours.ITL_BUCKETS
    # not vLLM's request buckets (lowest 0.3 s): the gateway's own resolve milliseconds
    assert ours.GATEWAY_BUCKETS[0] <= 0.001 < buckets.REQUEST_LATENCY_BUCKETS[0]


def test_metrics_count_tokens_errors_latency_and_limits(
    client: TestClient, engine: FakeEngine
) -> None:
    auth = key(client, rpm=3)
    assert client.post("/v1/chat/completions", json=CHAT, headers=auth).status_code == 200
    streamed = client.post("/v1/chat/completions", json=CHAT | {"stream": True}, headers=auth)
    assert streamed.status_code == 200
    engine.fail_with = EngineFailed("boom")
    assert client.post("/v1/chat/completions", json=CHAT, headers=auth).status_code == 502
    assert client.post("/v1/chat/completions", json=CHAT, headers=auth).status_code == 429
    text = client.get("/metrics").text
    version = {"model": "smollm2", "model_version": "135m-instruct"}
    assert sample(text, "tokens_used_total", **version, type="prompt") == 10
    assert sample(text, "tokens_used_total", **version, type="completion") == 6
    assert sample(text, "model_errors_total", **version, error_type="engine_error") == 1
    assert sample(text, "model_errors_total", **version, error_type="rate_limit_exceeded") == 1
    assert sample(text, "weir_requests_total", **version, stream="false", status="200") == 1
    assert sample(text, "weir_requests_total", **version, stream="true", status="200") == 1
    assert sample(text, "weir_requests_total", **version, status="502") == 1
    assert sample(text, "weir_time_to_first_token_seconds_count", **version, stream="true") == 1
    assert sample(text, "weir_inter_token_latency_seconds_count", **version) == 2  # 3 words
    assert sample(text, "weir_request_duration_seconds_count", **version, stream="false") == 3
    assert sample(text, "weir_ratelimit_rejections_total", limit="rpm") == 1
    assert sample(text, "weir_retries_total", model="smollm2") == 2  # the 502 was tried 3 times
    assert sample(text, "weir_inflight_requests", **version) == 0
    assert sample(text, "weir_engine_replicas_healthy", **version) == 1
    assert sample(text, "weir_breaker_state", replica="smollm2@135m-instruct#0") == 0
    assert sample(text, "weir_queue_wait_seconds_count", **version) == 3


def test_traces_continue_the_callers_and_reach_the_engine(tmp_path: Path) -> None:
    seen: list[str] = []

    async def chat(request: web.Request) -> web.Response:
        seen.append(request.headers.get("traceparent", ""))
        body = await request.json()
        answer = {
            "id": "x", "object": "chat.completion", "created": 1, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": "ok"}}],
            "usage": {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5},
        }  # fmt: skip
        return web.json_response(answer)

    async def health(_: web.Request) -> web.Response:
        return web.Response()

    loop = asyncio.new_event_loop()  # the engine runs in its own thread and loop
    server = web.Application()
    server.router.add_post("/v1/chat/completions", chat)
    server.router.add_get("/health", health)
    runner = web.AppRunner(server)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())  # its own port
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    def fleet(session: Any) -> Fleet:
        timeouts = EngineTimeouts(connect_s=2, idle_s=5, total_s=10, health_s=2)
        engine = HttpEngine("e", f"http://127.0.0.1:{port}", timeouts)
        return Fleet(
            [Replica(ReplicaKey("smollm2", "135m-instruct", 0), engine, "smollm2")],
            health_interval_s=0.05,
        )

    app = create_app(Settings(), fleet_factory=fleet, counters={}, tracer_provider=provider)
    caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    caller = f"00-{caller_trace}-00f067aa0ba902b7-01"
    try:
        with TestClient(app) as client:
            answer = client.post(
                "/v1/chat/completions",
                json=CHAT | {"max_tokens": 7, "temperature": 0},
                headers={"traceparent": caller},
            )
            assert answer.status_code == 200
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    server_span = spans["POST /v1/chat/completions"]
    assert f"{server_span.context.trace_id:032x}" == caller_trace
    assert server_span.parent is not None
    assert server_span.parent.span_id == 0x00F067AA0BA902B7
    attributes = dict(server_span.attributes or {})
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.model"] == "smollm2"
    assert attributes["gen_ai.request.max_tokens"] == 7
    assert attributes["gen_ai.usage.input_tokens"] == 4
    assert attributes["gen_ai.usage.output_tokens"] == 1
    assert attributes["http.response.status_code"] == 200
    for child in ("weir.limits", "weir.cache", "weir.engine"):
        parent = spans[child].parent
        assert parent is not None
        assert parent.span_id == server_span.context.span_id
    engine_span = spans["weir.engine"]
    # the engine got the engine span's context as its parent
    assert seen == [f"00-{caller_trace}-{engine_span.context.span_id:016x}-01"]


CANARIES = ("CANARY-PROMPT-7f3a", "CANARY-HEADER-91bd", "CANARY-KEY-c0de", "canary@example.org")


def test_no_secret_or_content_reaches_logs_or_metrics(
    client: TestClient, engine: FakeEngine, caplog: pytest.LogCaptureFixture
) -> None:
    prompt, header, bad_key, email = CANARIES
    auth = key(client, tpm=100000)
    secret = auth["authorization"].split()[1]
    engine.content = f"echo {prompt} {email}"  # the completion carries them too
    with caplog.at_level(logging.DEBUG):
        body = CHAT | {
            "messages": [{"role": "user", "content": f"{prompt} mail {email}"}],
            "user": email,
        }
        headers = auth | {"x-custom": header, "x-request-id": "req-123"}
        assert client.post("/v1/chat/completions", json=body, headers=headers).status_code == 200
        streamed = client.post(
            "/v1/chat/completions", json=body | {"stream": True}, headers=headers
        )
        assert streamed.status_code == 200
        wrong = {"authorization": f"Bearer {bad_key}"}
        assert client.post("/v1/chat/completions", json=body, headers=wrong).status_code == 401
        engine.fail_with = EngineFailed(f"engine said {prompt}")  # even an engine's echo
        client.post("/v1/chat/completions", json=body, headers=headers)
        metrics = client.get("/metrics").text
    logged = caplog.text + "".join(str(r.__dict__) for r in caplog.records)
    for canary in (*CANARIES, secret):
        assert canary not in logged, canary
        assert canary not in metrics, canary
    access = [r for r in caplog.records if r.name == "weir.access"]
    assert len(access) == 3
    line = access[0].__dict__["fields"]
    assert line["request_id"] == "req-123"
    assert line["key"] == auth["authorization"][7:][:0] or re.fullmatch(
        r"[0-9a-f]{12}", line["key"]
    )
    assert (line["model"], line["model_version"], line["status"]) == (
        "smollm2",
        "135m-instruct",
        200,
    )
    assert re.fullmatch(r"[0-9a-f]{16}", line["prompt_hash"])
    assert line["prompt_tokens"] == 5
    assert access[1].__dict__["fields"]["ttft_ms"] is not None


def metric_names(expr: str) -> set[str]:
    names = re.findall(r"(vllm:[a-z_:]+|weir_[a-z_]+|tokens_used_total|model_errors_total)", expr)
    return set(names)


def family(name: str) -> str:
    for suffix in ("_bucket", "_count", "_sum"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def test_every_dashboard_metric_exists(client: TestClient) -> None:
    import importlib.util
    import json

    spec = importlib.util.find_spec("vllm")
    assert spec is not None
    assert spec.submodule_search_locations
    loggers = Path(next(iter(spec.submodule_search_locations))) / "v1" / "metrics" / "loggers.py"
    vllm_names = set(re.findall(r'"(vllm:[a-z_:]+)"', loggers.read_text()))
    client.post("/v1/chat/completions", json=CHAT, headers=key(client))
    ours_text = client.get("/metrics").text
    our_families = set(re.findall(r"^# TYPE (\S+) ", ours_text, flags=re.MULTILINE))
    board = json.loads(Path("deploy/grafana/weir.json").read_text())
    queried = {n for p in board["panels"] for t in p["targets"] for n in metric_names(t["expr"])}
    assert len(queried) >= 15
    for name in sorted(queried):
        base = family(name)
        if name.startswith("vllm:"):
            # counters are exposed with _total; vLLM names them without it
            assert base in vllm_names or base.removesuffix("_total") in vllm_names, name
        else:
            assert base in our_families or base.removesuffix("_total") in our_families, name


def test_scrape_targets_lists_engine_endpoints() -> None:
    from serving.cli.scrape import file_sd

    engines: list[dict[str, Any]] = [
        {"replica": "m@v#0", "model": "m", "version": "v", "base_url": "http://10.0.0.5:8001"},
        {"replica": "m@v#1", "model": "m", "version": "v", "base_url": None},
    ]
    assert file_sd(engines) == [
        {"targets": ["10.0.0.5:8001"],
         "labels": {"model": "m", "model_version": "v", "replica": "m@v#0"}}
    ]  # fmt: skip


def test_json_log_lines_are_one_object_each() -> None:
    import io
    import json

    from serving.log_config import JsonLines

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLines())
    logger = logging.getLogger("weir.test-json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("hello %s", "there", extra={"fields": {"status": 200, "model": "m"}})
    finally:
        logger.removeHandler(handler)
    line = json.loads(stream.getvalue())
    assert line["message"] == "hello there"
    assert (line["status"], line["model"], line["level"]) == (200, "m", "WARNING")
    assert line["time"].endswith("Z")
