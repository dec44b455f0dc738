"""The use case behind every OpenAI route: resolve, check the contract, pick, call, clean.

Routes stay thin: they validate the body (``serving.protocol``) and hand it here with the
``Route`` that says which engine path serves it, which task the model must have, how the
contract prepares it and how the answer is cleaned. Errors are raised, never returned.
The engine call is cancelled the moment the client disconnects.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from opentelemetry import trace
from opentelemetry.trace import Tracer
from starlette.requests import Request
from starlette.responses import Response

from models.fleet import Fleet
from models.registry import Registry, split_name
from models.tokenizer import TokenCounter
from models.types import ServedVersion, Task
from serving import contract, output_check, responses, streaming
from serving.disconnect import SSEResponse, run_or_cancel
from serving.dispatch import Dispatcher
from serving.errors import (
    GatewayError,
    InvalidModelOutput,
    InvalidRequest,
    PermissionDenied,
    RateLimited,
    WrongTask,
    spec_for,
)
from serving.keys.records import KeyRecord
from serving.limits.limiter import UNLIMITED_TICKET, Limiter, Ticket, Unlimited
from serving.limits.plan import plan, reservation_size
from serving.middleware import request_id_of
from serving.observe.metrics import Metrics
from serving.observe.record import Observation
from serving.protocol.requests import ModelRequest
from serving.settings import ContractConfig

JSON = dict[str, Any]
Cleaner = Callable[[JSON, str, ServedVersion], JSON]
Preparer = Callable[[Any, TokenCounter | None, ContractConfig], contract.Prepared]
VERSION_HEADER = "x-weir-model-version"
FALLBACK_HEADER = "x-weir-fallback"
OUTPUT_VALID_HEADER = "x-weir-output-valid"
TASK_NAMES = {"chat": "a chat model", "embed": "an embedding model"}
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


@dataclass(frozen=True)
class Route:
    path: str
    task: Task
    prepare: Preparer
    clean: Cleaner
    streams: bool = True


CHAT = Route("/v1/chat/completions", "chat", contract.prepare_chat, responses.clean_generation)
COMPLETIONS = Route(
    "/v1/completions", "chat", contract.prepare_completion, responses.clean_generation
)
EMBEDDINGS = Route(
    "/v1/embeddings",
    "embed",
    contract.prepare_embeddings,
    responses.clean_embeddings,
    streams=False,
)


class JSONBytes(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class Proxy:
    def __init__(
        self,
        registry: Registry,
        dispatcher: Dispatcher,
        counters: Mapping[str, TokenCounter],
        config: ContractConfig,
        limiter: Limiter | None = None,
        model_tpm: Mapping[str, int] | None = None,
        metrics: Metrics | None = None,
        tracer: Tracer | None = None,
        log_requests: bool = True,
    ) -> None:
        self.metrics = metrics
        self.tracer = tracer or trace.NoOpTracer()
        self.log_requests = log_requests
        self.registry = registry
        self.dispatcher = dispatcher
        self.fleet: Fleet = dispatcher.fleet
        self.counters = counters
        self.config = config
        self.limiter = limiter
        self.model_tpm = model_tpm or {}

    def __repr__(self) -> str:
        return f"Proxy(registry={self.registry!r}, fleet={self.fleet!r})"

    async def handle(self, route: Route, request: ModelRequest, http: Request) -> Response:
        key: KeyRecord | None = getattr(http.state, "key", None)
        obs = Observation(
            self.metrics, route.path, bool(request.stream), request_id_of(http.scope),
            key.id if key is not None else "-", self.log_requests,
        )  # fmt: skip
        try:
            return await self._handle(route, request, http, key, obs)
        except BaseException as exc:
            spec = spec_for(exc)
            status, code = (spec.status, spec.code) if spec else (500, "internal_error")
            if isinstance(exc, RateLimited) and self.metrics is not None:
                self.metrics.limit_rejections.labels(exc.limit).inc()
            obs.finish(status, error_type=code)
            raise

    async def _handle(
        self,
        route: Route,
        request: ModelRequest,
        http: Request,
        key: KeyRecord | None,
        obs: Observation,
    ) -> Response:
        requested = request.model
        if key is not None and not key.allows(split_name(requested)[0]):
            # said before the registry is asked: no hint whether the model exists
            raise PermissionDenied("This API key may not use the requested model.", param="model")
        served = self.registry.resolve(requested)
        obs.served(served.model, served.version)
        if served.task != route.task:
            raise WrongTask(
                f"The model '{requested}' is {TASK_NAMES[served.task]}; "
                f"it does not serve {route.path}.",
                param="model",
            )
        if request.stream and not route.streams:
            raise InvalidRequest(f"{route.path} does not stream", param="stream")
        prepared = route.prepare(request, self.counters.get(served.key), self.config)
        obs.asked(prepared.body)
        http.state.prompt_tokens = prepared.prompt_tokens
        with self.tracer.start_as_current_span("weir.limits"):
            ticket = await self._admit(key, served, prepared, getattr(request, "n", 1) or 1)
        http.state.ticket = ticket
        try:
            return await self._serve(route, request, http, served, prepared, ticket, obs)
        except BaseException:
            ticket.finish(None)  # failed, timed out or cancelled before an answer: release
            raise

    async def _admit(
        self, key: KeyRecord | None, served: ServedVersion, prepared: contract.Prepared, n: int
    ) -> Ticket | Unlimited:
        if self.limiter is None:
            return UNLIMITED_TICKET
        tokens = reservation_size(prepared.prompt_tokens, prepared.max_tokens, n)
        checks = plan(key, served.model, tokens, self.model_tpm.get(served.model))
        return await self.limiter.admit(served.model, checks)

    def _target(
        self,
        route: Route,
        request: ModelRequest,
        served: ServedVersion,
        prepared: contract.Prepared,
    ) -> tuple[ServedVersion, contract.Prepared, bool]:
        """``served``, or the first of its fallbacks that can take the request when it can't."""
        if self.dispatcher.available(served):
            return served, prepared, False
        for fallback in self.registry.fallbacks(served.model):
            if fallback.task != route.task or not self.dispatcher.available(fallback):
                continue
            try:
                again = route.prepare(request, self.counters.get(fallback.key), self.config)
            except GatewayError:
                continue  # e.g. the prompt does not fit the fallback's context
            return fallback, again, True
        return served, prepared, False  # nothing better: queue for it or fail as it fails

    def _affinity(self, served: ServedVersion, body: JSON) -> str | None:
        routing = self.dispatcher.routing.get(served.model)
        if routing is None or not routing.prefix_affinity:
            return None
        return prompt_prefix(body, routing.affinity_prefix_chars)

    async def _serve(
        self,
        route: Route,
        request: ModelRequest,
        http: Request,
        served: ServedVersion,
        prepared: contract.Prepared,
        ticket: Ticket | Unlimited,
        obs: Observation,
    ) -> Response:
        requested = request.model
        target, prepared, fell_back = self._target(route, request, served, prepared)
        queued = time.perf_counter()
        slot = await self.dispatcher.admit(target)
        if self.metrics is not None:
            wait = time.perf_counter() - queued
            self.metrics.queue_wait.labels(target.model, target.version).observe(wait)
        body = prepared.body
        headers = {VERSION_HEADER: target.version, **ticket.headers}
        if fell_back:
            headers[FALLBACK_HEADER] = target.key
            obs.fell_back(target.model, target.version)
            if self.metrics is not None:
                self.metrics.fallbacks.labels(served.model, target.key).inc()
        affinity = self._affinity(target, body)

        if request.stream:
            options = body.get("stream_options") or {}
            wants_usage = bool(options.get("include_usage"))
            body["stream_options"] = {**options, "include_usage": True}  # what settles limits
            used: list[JSON] = []

            def fix(chunk: JSON) -> JSON | None:
                usage = chunk.get("usage")
                if isinstance(usage, dict) and isinstance(usage.get("total_tokens"), int):
                    used.append(usage)
                if _has_content(chunk):
                    obs.content()
                if not wants_usage:
                    if usage and not chunk.get("choices"):
                        return None
                    chunk.pop("usage", None)
                return route.clean(chunk, requested, target)

            try:
                stream, attempt = await run_or_cancel(
                    self.dispatcher.open_stream(target, route.path, body, affinity), http.receive
                )
            except BaseException:
                slot.release()
                raise

            def ended(error: BaseException | None) -> None:
                total = used[-1]["total_tokens"] if used else ticket.reserved
                ticket.finish(total if error is None else None)
                attempt.end(error)
                slot.release()
                spec = spec_for(error) if error is not None else None
                code = None if error is None else (spec.code if spec else "internal_error")
                obs.finish(200, error_type=code, usage=used[-1] if used else None)

            def closed() -> None:  # the client left, or the stream never started
                ticket.finish(None)
                attempt.end(None, left=True)
                slot.release()
                obs.finish(499, error_type="client_closed_request")

            events = streaming.relay(stream, fix, request_id_of(http.scope), ended)
            return SSEResponse(events, headers=headers | SSE_HEADERS, on_close=closed)

        try:
            answer, _ = await run_or_cancel(
                self.dispatcher.complete(target, route.path, body, affinity), http.receive
            )
        finally:
            slot.release()
        ticket.finish(_total_tokens(answer, ticket.reserved))
        usage = answer.get("usage")
        obs.finish(200, usage=usage if isinstance(usage, dict) else None)
        schema = output_check.schema_of(body.get("response_format"))
        if schema is not None:
            try:
                output_check.check_chat_output(answer, schema)
                headers[OUTPUT_VALID_HEADER] = "true"
            except InvalidModelOutput:
                if self.config.invalid_output == "reject":
                    raise
                headers[OUTPUT_VALID_HEADER] = "false"
        return JSONBytes(route.clean(answer, requested, target), headers=headers)


def _has_content(chunk: JSON) -> bool:
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta")
        if isinstance(delta, dict) and delta.get("content"):
            return True
        if choice.get("text"):
            return True
    return False


def prompt_prefix(body: JSON, chars: int) -> str:
    """The first ``chars`` characters of the prompt, as the engine's prefix cache sees it."""
    messages = body.get("messages")
    if isinstance(messages, list):
        parts = []
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            parts.append(content if isinstance(content, str) else str(content))
        text = "\x1e".join(parts)
    else:
        text = str(body.get("prompt", body.get("input", "")))
    return text[:chars]


def _total_tokens(answer: JSON, fallback: int) -> int:
    """What the engine says the request used; the reservation if it does not say."""
    usage = answer.get("usage")
    total = usage.get("total_tokens") if isinstance(usage, dict) else None
    return total if isinstance(total, int) else fallback
