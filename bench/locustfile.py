"""The Locust suite: streaming chat, chat, completions, embeddings, and open-loop arrivals.

A black-box HTTP client of the gateway: it imports nothing of Weir's. Streaming users
read the SSE stream themselves (``bench.sse``) and report TTFT, mean inter-token gap and
end-to-end time to Locust as request events, and every request's raw timings (integer
nanoseconds; Locust rounds its own) to ``--weir-samples`` as JSON lines.

Variants: ``--weir-versions v1,v2`` pins each request to a version (``model@v1``);
``--weir-compare-host URL`` adds a ``direct`` variant sent to another base URL (an
engine), so gateway and engine are measured in the same run, interleaved.

    locust -f bench/locustfile.py --headless -u 8 -r 8 -t 60s --host http://127.0.0.1:8000 \\
        StreamingChatUser --weir-samples samples.jsonl
"""

from __future__ import annotations

import itertools
import json
import os
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import gevent
import requests
from gevent.lock import BoundedSemaphore
from locust import HttpUser, LoadTestShape, User, between, constant, events, task
from locust.env import Environment

from bench import payloads, shapes
from bench.sse import SSETimer, StreamTiming

TIMEOUT_S = 600


@dataclass(frozen=True)
class Variant:
    label: str
    base_url: str
    model: str


class Samples:
    """Raw per-request timings, one JSON object a line, written under a lock."""

    def __init__(self, path: str | None) -> None:
        self._file = open(path, "a", buffering=1) if path else None  # noqa: SIM115 (kept open for the run)
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        line = json.dumps(record)
        with self._lock:
            self._file.write(line + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class Suite:
    """What the command line configured, built once at init and shared by every user."""

    def __init__(self, environment: Environment) -> None:
        options = environment.parsed_options
        host = (environment.host or "http://127.0.0.1:8000").rstrip("/")
        model = options.weir_model if options else "smollm2"
        versions = [v for v in (options.weir_versions if options else "").split(",") if v]
        self.variants = [Variant(v, host, f"{model}@{v}") for v in versions] or [
            Variant("gateway", host, model)
        ]
        if options and options.weir_compare_host:
            compare_model = options.weir_compare_model or model
            self.variants.append(
                Variant("direct", options.weir_compare_host.rstrip("/"), compare_model)
            )
        self.embed_model = options.weir_embed_model if options else "minilm"
        self.turns = itertools.cycle(self.variants)
        seed = options.weir_seed if options else 1
        self.payloads = payloads.make(options.weir_mix if options else "fixed", seed)
        self.samples = Samples(options.weir_samples if options else None)
        self.rate = options.weir_rate if options else 1.0
        self._lock = threading.Lock()

    def next(self) -> tuple[Variant, payloads.Payload]:
        with self._lock:
            return next(self.turns), next(self.payloads)


SUITE: dict[str, Suite] = {}


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    group = parser.add_argument_group("weir")
    group.add_argument("--weir-model", default="smollm2", help="public chat model name")
    group.add_argument("--weir-embed-model", default="minilm")
    group.add_argument("--weir-versions", default="", help="comma-separated versions to pin")
    group.add_argument(
        "--weir-compare-host", default="", help="a second base URL: the direct variant"
    )
    group.add_argument("--weir-compare-model", default="", help="model name at the compare host")
    group.add_argument("--weir-mix", default="fixed", choices=sorted(payloads.GENERATORS))
    group.add_argument("--weir-seed", type=int, default=1)
    group.add_argument("--weir-samples", default="", help="raw samples (JSON lines) go here")
    group.add_argument("--weir-rate", type=float, default=2.0, help="ArrivalUser: requests/s")


@events.init.add_listener
def _init(environment: Environment, **_: Any) -> None:
    SUITE["suite"] = Suite(environment)


@events.quitting.add_listener
def _quit(environment: Environment, **_: Any) -> None:
    if "suite" in SUITE:
        SUITE["suite"].samples.close()


def fire(
    environment: Environment, kind: str, name: str, ms: float, length: int, error: str | None
) -> None:
    environment.events.request.fire(
        request_type=kind,
        name=name,
        response_time=ms,
        response_length=length,
        exception=RuntimeError(error) if error else None,
        context={},
    )


def stream_chat(environment: Environment, session: requests.Session) -> None:
    suite = SUITE["suite"]
    variant, payload = suite.next()
    body = payload.chat_body(variant.model, stream=True)
    wall = time.time_ns()
    timer = SSETimer()
    status = 0
    error: str | None = None
    try:
        with session.post(
            f"{variant.base_url}/v1/chat/completions", json=body, stream=True, timeout=TIMEOUT_S
        ) as response:
            status = response.status_code
            if status != 200:
                error = _error_code(response)
            else:
                for piece in response.iter_content(chunk_size=None):
                    timer.feed(piece)
    except requests.RequestException as exc:
        error = f"transport:{type(exc).__name__}"
    timing = timer.finish()
    error = error or timing.error or (None if timing.ok else "incomplete_stream")
    _report_stream(environment, suite, variant, wall, status, error, timing)


def _report_stream(
    environment: Environment,
    suite: Suite,
    variant: Variant,
    wall: int,
    status: int,
    error: str | None,
    timing: StreamTiming,
) -> None:
    e2e = timing.e2e_ms or 0.0
    fire(
        environment,
        "SSE",
        f"chat-stream [{variant.label}]",
        e2e,
        timing.completion_tokens or 0,
        error,
    )
    if error is None and timing.ttft_ms is not None:
        fire(environment, "TTFT", f"ttft [{variant.label}]", timing.ttft_ms, 0, None)
        gaps = timing.gaps_ms
        if gaps:
            fire(
                environment,
                "ITL",
                f"inter-token mean [{variant.label}]",
                sum(gaps) / len(gaps),
                0,
                None,
            )
    first = timing.first_content_ns
    suite.samples.write(
        {
            "kind": "chat-stream",
            "variant": variant.label,
            "start_wall_ns": wall,
            "status": status,
            "error": error,
            "ttft_ns": None if first is None else first - timing.started_ns,
            "gaps_ns": [b - a for a, b in itertools.pairwise(timing.content_ns)],
            "e2e_ns": (timing.ended_ns or timing.started_ns) - timing.started_ns,
            "prompt_tokens": timing.prompt_tokens,
            "completion_tokens": timing.completion_tokens,
        }
    )


def _error_code(response: requests.Response) -> str:
    try:
        error = response.json().get("error") or {}
        return str(error.get("code") or error.get("type") or response.status_code)
    except ValueError:
        return f"http_{response.status_code}"


def plain_request(environment: Environment, session: requests.Session, kind: str) -> None:
    suite = SUITE["suite"]
    variant, payload = suite.next()
    if kind == "embeddings":
        path, body = (
            "/v1/embeddings",
            {"model": suite.embed_model, "input": [payload.prompt_text[:500]]},
        )
    elif kind == "completion":
        body = {
            "model": variant.model,
            "prompt": payload.prompt_text,
            "max_tokens": payload.max_tokens,
            "ignore_eos": True,
        }
        path = "/v1/completions"
    elif kind == "rag":
        path = "/v1/chat/completions"
        body = payload.chat_body(variant.model, stream=False)
        body["weir"] = {"retrieval": {"collection": RAG_COLLECTION, "top_k": 4}}
    else:
        path, body = "/v1/chat/completions", payload.chat_body(variant.model, stream=False)
    wall = time.time_ns()
    started = time.perf_counter_ns()
    status, error = 0, None
    usage: dict[str, Any] = {}
    try:
        response = session.post(f"{variant.base_url}{path}", json=body, timeout=TIMEOUT_S)
        status = response.status_code
        if status == 200:
            usage = response.json().get("usage") or {}
            if kind == "rag" and response.headers.get("x-weir-retrieval") != "ok":
                error = "retrieval_degraded"  # answered, but without its context
        else:
            error = _error_code(response)
    except requests.RequestException as exc:
        error = f"transport:{type(exc).__name__}"
    e2e = time.perf_counter_ns() - started
    fire(
        environment,
        "POST",
        f"{kind} [{variant.label}]",
        e2e / 1e6,
        int(usage.get("completion_tokens") or 0),
        error,
    )
    suite.samples.write(
        {
            "kind": kind,
            "variant": variant.label,
            "start_wall_ns": wall,
            "status": status,
            "error": error,
            "e2e_ns": e2e,
            "prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage.get("completion_tokens"),
        }
    )


class _Base(HttpUser):
    abstract = True
    wait_time = between(0.0, 0.1)

    def on_start(self) -> None:
        self.session = requests.Session()

    def on_stop(self) -> None:
        self.session.close()


class StreamingChatUser(_Base):
    @task
    def chat_stream(self) -> None:
        stream_chat(self.environment, self.session)


class ChatUser(_Base):
    @task
    def chat(self) -> None:
        plain_request(self.environment, self.session, "chat")


RAG_COLLECTION = "weir-bench-rag"
RAG_FACTS = [
    f"Fact {n}: the {colour} door on floor {n % 9} opens with code {1000 + n * 37}."
    for n, colour in enumerate(["red", "blue", "green", "white", "black"] * 10)
]


class RagUser(_Base):
    """Chat with retrieval from a small collection this user makes sure exists."""

    def on_start(self) -> None:
        super().on_start()
        base = SUITE["suite"].variants[0].base_url
        self.session.post(f"{base}/v1/collections", json={"name": RAG_COLLECTION}, timeout=30)
        documents = [{"id": f"fact-{n}", "text": text} for n, text in enumerate(RAG_FACTS)]
        self.session.post(
            f"{base}/v1/collections/{RAG_COLLECTION}/documents",
            json={"documents": documents},
            timeout=TIMEOUT_S,
        )

    @task
    def rag(self) -> None:
        plain_request(self.environment, self.session, "rag")


class CompletionUser(_Base):
    @task
    def completion(self) -> None:
        plain_request(self.environment, self.session, "completion")


class EmbeddingUser(_Base):
    @task
    def embeddings(self) -> None:
        plain_request(self.environment, self.session, "embeddings")


class ArrivalUser(User):
    """Open loop: streaming requests start on a Poisson schedule at ``--weir-rate`` per
    second (split over the users), whatever the responses do, so queueing shows."""

    wait_time = constant(0)
    in_flight_cap = 2000

    def on_start(self) -> None:
        self.session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_maxsize=self.in_flight_cap)
        self.session.mount("http://", adapter)
        self.slots = BoundedSemaphore(self.in_flight_cap)

    @task
    def arrive(self) -> None:
        rate = SUITE["suite"].rate / max(
            1, self.environment.runner.user_count if self.environment.runner else 1
        )
        gevent.sleep(random.expovariate(rate))
        if not self.slots.acquire(blocking=False):
            fire(self.environment, "SSE", "arrival dropped (in-flight cap)", 0.0, 0, "dropped")
            return

        def one() -> None:
            try:
                stream_chat(self.environment, self.session)
            finally:
                self.slots.release()

        gevent.spawn(one)


def _staged_shape() -> Iterator[type[LoadTestShape]]:
    """A shape class only when ``bench.run`` asked for one (Locust uses any it finds)."""
    table = os.environ.get("WEIR_BENCH_STAGES")
    if table:
        rows = [shapes.Stage(**row) for row in json.loads(table)]

        class Staged(LoadTestShape):
            def tick(self) -> tuple[int, float] | None:
                return shapes.tick(rows, self.get_run_time())

        yield Staged


for _shape in _staged_shape():
    StagedLoad = _shape
