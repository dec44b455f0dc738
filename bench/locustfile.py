"""The Locust suite: streaming chat, chat, completions, embeddings, and open-loop arrivals.

A black-box HTTP client of the gateway: it imports nothing of Weir's. Streaming users
read the SSE stream themselves (``bench.sse``) and report TTFT, mean inter-token gap and
end-to-end time to Locust as request events, and every request's raw timings (integer
nanoseconds; Locust rounds its own) to ``--weir-samples`` as JSON lines.

Variants: ``--weir-versions v1,v2`` pins each request to a version (``model@v1``);
``--weir-compare-host URL`` adds a ``direct`` variant sent to another base URL (an
engine, or any OpenAI-compatible server), so gateway and engine are measured in the same
run, interleaved. Any OpenAI-compatible URL can be the host itself: ``--weir-label``
names it, ``--weir-api-key`` (or ``WEIR_BENCH_API_KEY``) authenticates, and
``--weir-openai-strict`` leaves out vLLM's ``ignore_eos`` for servers that refuse
unknown fields.

Distributed: under Locust's ``--master``/``--worker``, workers ship their raw samples to
the master (``bench.distributed``); ``--weir-run-time`` ends such a run.

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
from typing import Any, Protocol

import gevent
import requests
from gevent.lock import BoundedSemaphore
from gevent.pool import Group
from locust import HttpUser, LoadTestShape, User, between, constant, events, task
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner

from bench import distributed, payloads, shapes
from bench.sse import SSETimer, StreamTiming

TIMEOUT_S = 600


class Sink(Protocol):
    """Where samples go: ``Samples`` (a file), or on a worker, the master."""

    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Variant:
    label: str
    base_url: str
    model: str
    api_key: str = ""

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


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

    def __init__(self, environment: Environment, sink: Sink | None = None) -> None:
        options = environment.parsed_options
        host = (environment.host or "http://127.0.0.1:8000").rstrip("/")
        model = options.weir_model if options else "smollm2"
        key = (options.weir_api_key if options else "") or os.environ.get("WEIR_BENCH_API_KEY", "")
        versions = [v for v in (options.weir_versions if options else "").split(",") if v]
        label = (options.weir_label if options else "") or "gateway"
        self.variants = [Variant(v, host, f"{model}@{v}", key) for v in versions] or [
            Variant(label, host, model, key)
        ]
        if options and options.weir_compare_host:
            compare_model = options.weir_compare_model or model
            compare_key = options.weir_compare_api_key or os.environ.get(
                "WEIR_BENCH_COMPARE_API_KEY", ""
            )
            self.variants.append(
                Variant(
                    options.weir_compare_label or "direct",
                    options.weir_compare_host.rstrip("/"),
                    compare_model,
                    compare_key,
                )
            )
        self.embed_model = options.weir_embed_model if options else "minilm"
        self.strict = bool(options and options.weir_openai_strict)
        self.turns = itertools.cycle(self.variants)
        seed = options.weir_seed if options else 1
        self.payloads = payloads.make(options.weir_mix if options else "fixed", seed)
        self.samples: Sink = sink or Samples(options.weir_samples if options else None)
        self.rate = options.weir_rate if options else 1.0
        self.arrival_users = max(1, options.weir_arrival_users if options else 1)
        self._lock = threading.Lock()

    def next(self) -> tuple[Variant, payloads.Payload]:
        with self._lock:
            return next(self.turns), next(self.payloads)

    def chat_body(self, payload: payloads.Payload, model: str, stream: bool) -> dict[str, Any]:
        body = payload.chat_body(model, stream=stream)
        if self.strict:
            body.pop("ignore_eos", None)
        return body


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
    group.add_argument(
        "--weir-arrival-users", type=int, default=1, help="ArrivalUsers in the run, all workers"
    )
    group.add_argument("--weir-label", default="", help="the host's variant name (gateway)")
    group.add_argument("--weir-compare-label", default="direct")
    group.add_argument("--weir-api-key", default="", help="Bearer key for the host")
    group.add_argument("--weir-compare-api-key", default="", help="Bearer key, compare host")
    group.add_argument(
        "--weir-openai-strict", action="store_true", help="send no vLLM extension fields"
    )
    group.add_argument(
        "--weir-run-time", type=float, default=0.0, help="master: seconds, then the handshake"
    )


@events.init.add_listener
def _init(environment: Environment, **_: Any) -> None:
    suite = SUITE["suite"] = Suite(environment)
    runner, options = environment.runner, environment.parsed_options
    if isinstance(runner, WorkerRunner):
        suite.samples.close()
        suite.samples = distributed.WorkerOutbox(environment, runner)
    elif isinstance(runner, MasterRunner):
        suite.samples.close()
        inbox = distributed.MasterInbox(
            environment, runner, options.weir_samples if options else ""
        )
        suite.samples = inbox
        if options and options.weir_run_time > 0:
            distributed.schedule_finish(environment, inbox, options.weir_run_time)
    if environment.web_ui is not None:
        from bench import web_tab

        web_tab.install(environment)


@events.test_start.add_listener
def _start(environment: Environment, **_: Any) -> None:
    """A worker learns the run's options (host, model, versions...) from the master's
    spawn message, after init: its suite is rebuilt from them, keeping its outbox."""
    if isinstance(environment.runner, WorkerRunner) and "suite" in SUITE:
        SUITE["suite"] = Suite(environment, sink=SUITE["suite"].samples)


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


def stream_chat(
    environment: Environment,
    session: requests.Session,
    turn: tuple[Variant, payloads.Payload] | None = None,
) -> None:
    suite = SUITE["suite"]
    variant, payload = turn or suite.next()
    body = suite.chat_body(payload, variant.model, stream=True)
    wall = time.time_ns()
    timer = SSETimer()
    status = 0
    error: str | None = None
    try:
        with session.post(
            f"{variant.base_url}/v1/chat/completions",
            json=body,
            headers=variant.headers,
            stream=True,
            timeout=TIMEOUT_S,
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
        }
        if not suite.strict:
            body["ignore_eos"] = True
        path = "/v1/completions"
    elif kind == "rag":
        path = "/v1/chat/completions"
        body = suite.chat_body(payload, variant.model, stream=False)
        body["weir"] = {"retrieval": {"collection": RAG_COLLECTION, "top_k": 4}}
    else:
        path, body = "/v1/chat/completions", suite.chat_body(payload, variant.model, False)
    wall = time.time_ns()
    started = time.perf_counter_ns()
    status, error = 0, None
    usage: dict[str, Any] = {}
    try:
        response = session.post(
            f"{variant.base_url}{path}", json=body, headers=variant.headers, timeout=TIMEOUT_S
        )
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
    second (split over ``--weir-arrival-users``, on every worker), whatever the responses
    do, so queueing shows. A request still in flight when the run's stop timeout ends is
    recorded as ``cut_at_stop``, so it counts against the SLO rather than vanishing."""

    wait_time = constant(0)
    in_flight_cap = 2000

    def on_start(self) -> None:
        self.session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_maxsize=self.in_flight_cap)
        self.session.mount("http://", adapter)
        self.slots = BoundedSemaphore(self.in_flight_cap)
        self.in_flight = Group()

    def on_stop(self) -> None:
        self.in_flight.join(timeout=self.environment.stop_timeout or None)
        self.in_flight.kill(block=True, timeout=5)

    @task
    def arrive(self) -> None:
        suite = SUITE["suite"]
        gevent.sleep(random.expovariate(suite.rate / suite.arrival_users))
        if not self.slots.acquire(blocking=False):
            fire(self.environment, "SSE", "arrival dropped (in-flight cap)", 0.0, 0, "dropped")
            return
        turn = suite.next()
        wall, started = time.time_ns(), time.perf_counter_ns()

        def one() -> None:
            try:
                stream_chat(self.environment, self.session, turn)
            except gevent.GreenletExit:
                fire(self.environment, "SSE", f"chat-stream [{turn[0].label}]", 0, 0, "cut")
                suite.samples.write(
                    {
                        "kind": "chat-stream", "variant": turn[0].label, "start_wall_ns": wall,
                        "status": 0, "error": "cut_at_stop", "ttft_ns": None, "gaps_ns": [],
                        "e2e_ns": time.perf_counter_ns() - started,
                        "prompt_tokens": None, "completion_tokens": None,
                    }
                )  # fmt: skip
                raise
            finally:
                self.slots.release()

        self.in_flight.spawn(one)


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
