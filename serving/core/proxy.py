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

from opentelemetry.trace import Tracer
from starlette.requests import Request
from starlette.responses import Response

from models.engines.fleet import Fleet
from models.registry import Registry, split_name
from models.tokenizer import TokenCounter
from models.types import ServedVersion, Task
from serving import streaming
from serving.cache.entries import (
    RESULT_HEADER,
    Assembler,
    extension,
)
from serving.cache.service import Cache
from serving.core import cleaning, contract, output_check
from serving.core.answer import SSE_HEADERS, VERSION_HEADER, JSONBytes, total_tokens
from serving.core.cached_calls import CachedCalls, CachePlan
from serving.core.disconnect import SSEResponse, run_or_cancel
from serving.core.rag import RetrievalGate
from serving.errors import (
    GatewayError,
    InvalidModelOutput,
    InvalidRequest,
    PermissionDenied,
    RateLimited,
    WrongTask,
    spec_for,
)
from serving.http.front import request_id_of
from serving.keys.records import KeyRecord
from serving.limits.limiter import UNLIMITED_TICKET, Limiter, Ticket, Unlimited
from serving.limits.plan import plan, reservation_size
from serving.observe.metrics import Metrics
from serving.observe.record import Observation
from serving.observe.tracing import recording, span
from serving.protocol.requests import ModelRequest
from serving.rollout.tracker import VersionTracker
from serving.routing.dispatch import Dispatcher
from serving.settings import ContractConfig

JSON = dict[str, Any]
Cleaner = Callable[[JSON, str, ServedVersion], JSON]
Preparer = Callable[[Any, TokenCounter | None, ContractConfig], contract.Prepared]
FALLBACK_HEADER = "x-weir-fallback"
RETRIEVAL_HEADER = "x-weir-retrieval"
PIN_HEADER = "x-weir-model-version"  # on a request: serve this version (same as name@v)
OUTPUT_VALID_HEADER = "x-weir-output-valid"
TASK_NAMES = {"chat": "a chat model", "embed": "an embedding model"}


@dataclass(frozen=True)
class Route:
    path: str
    task: Task
    prepare: Preparer
    clean: Cleaner
    streams: bool = True


CHAT = Route("/v1/chat/completions", "chat", contract.prepare_chat, cleaning.clean_generation)
COMPLETIONS = Route(
    "/v1/completions", "chat", contract.prepare_completion, cleaning.clean_generation
)
EMBEDDINGS = Route(
    "/v1/embeddings",
    "embed",
    contract.prepare_embeddings,
    cleaning.clean_embeddings,
    streams=False,
)


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
        cache: Cache | None = None,
        cache_embeddings: bool = True,
        rag: RetrievalGate | None = None,
    ) -> None:
        self.rag = rag
        self.tracker = VersionTracker()
        self.cache = cache
        self.cache_embeddings = cache_embeddings
        self.cached = (
            CachedCalls(cache, dispatcher, recording(tracer), metrics, cache_embeddings)
            if cache is not None
            else None
        )
        self.metrics = metrics
        self.tracer = recording(tracer)
        self.log_requests = log_requests
        self.registry = registry
        self.dispatcher = dispatcher
        self.fleet: Fleet = dispatcher.fleet
        self.counters = dict(counters)  # a deploy adds its version's counter
        self.config = config
        self.limiter = limiter
        self.model_tpm = model_tpm or {}

    def __repr__(self) -> str:
        return f"Proxy(registry={self.registry!r}, fleet={self.fleet!r})"

    async def handle(self, route: Route, request: ModelRequest, http: Request) -> Response:
        key: KeyRecord | None = getattr(http.state, "key", None)
        obs = Observation(
            self.metrics, route.path, bool(request.stream), request_id_of(http.scope),
            key.id if key is not None else "-", self.log_requests, self.tracker,
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
        pin = http.headers.get(PIN_HEADER)
        if pin and "@" not in request.model:
            request.model = f"{request.model}@{pin}"  # a pinned version, by header
        requested = request.model
        if key is not None and not key.allows(split_name(requested)[0]):
            # said before the registry is asked: no hint whether the model exists
            raise PermissionDenied("This API key may not use the requested model.", param="model")
        served = self.registry.resolve(requested, sticky=self._sticky(request, http, key))
        obs.served(served.model, served.version)
        if served.task != route.task:
            raise WrongTask(
                f"The model '{requested}' is {TASK_NAMES[served.task]}; "
                f"it does not serve {route.path}.",
                param="model",
            )
        if request.stream and not route.streams:
            raise InvalidRequest(f"{route.path} does not stream", param="stream")
        spec = extension(request.model_extra or {}).get("retrieval")
        if spec is not None:
            request = await self._augment(route, request, http, spec)
        prepared = route.prepare(request, self.counters.get(served.key), self.config)
        obs.asked(prepared.body)
        http.state.prompt_tokens = prepared.prompt_tokens
        with span(self.tracer, "weir.limits"):
            ticket = await self._admit(key, served, prepared, getattr(request, "n", 1) or 1)
        http.state.ticket = ticket
        plan = (
            self.cached.plan(route.path, route is EMBEDDINGS, http, key, served, prepared)
            if self.cached
            else None
        )
        try:
            if plan is not None and plan.mode == "use" and route.streams:
                hit = (
                    await self.cached.hit(request, served, plan, ticket, obs)
                    if self.cached
                    else None
                )
                if hit is not None:
                    return hit
            return await self._serve(route, request, http, served, prepared, ticket, obs, plan)
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

    async def _augment(
        self, route: Route, request: ModelRequest, http: Request, spec: Any
    ) -> ModelRequest:
        """RAG: the request with retrieved passages in its messages (or as it was)."""
        if route is not CHAT or self.rag is None:
            raise InvalidRequest(
                "weir.retrieval works on chat completions, with retrieval on.",
                param="weir.retrieval",
            )
        with span(self.tracer, "weir.retrieval"):
            asked = request.model_dump(exclude_unset=True)
            messages, found = await self.rag.augment(http, asked, spec)
        http.state.rag = found
        if messages is None:
            return request
        return type(request).model_validate({**asked, "messages": messages})

    def _sticky(self, request: ModelRequest, http: Request, key: KeyRecord | None) -> str | None:
        """What keeps a caller on one version of a split, if the model asks for it."""
        model = self.registry.model(split_name(request.model)[0])
        if model is None or model.sticky == "none":
            return None
        if model.sticky == "key":
            return key.id if key else getattr(http.state, "static_key", None)
        messages = getattr(request, "messages", None) or []
        first = next((m for m in messages if getattr(m, "role", None) == "user"), None)
        opening = getattr(first, "content", None) if first is not None else None
        user = getattr(request, "user", None)
        return f"{user or ''}\x00{opening}" if (user or opening) else None

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
        plan: CachePlan | None = None,
    ) -> Response:
        requested = request.model
        target, prepared, fell_back = self._target(route, request, served, prepared)
        queued = time.perf_counter()
        slot = await self.dispatcher.admit(target)
        if self.metrics is not None:
            wait = time.perf_counter() - queued
            self.metrics.queue_wait.labels(target.model, target.version).observe(wait)
        body = prepared.body
        body.pop("weir", None)  # our extension never reaches the engine
        headers = {VERSION_HEADER: target.version, **ticket.headers}
        if fell_back:
            headers[FALLBACK_HEADER] = target.key
            obs.fell_back(target.model, target.version)
            if self.metrics is not None:
                self.metrics.fallbacks.labels(served.model, target.key).inc()
        affinity = self._affinity(target, body)
        cache = self.cache
        # a fallback's answer is not the requested version's: never stored under its key
        store_key = plan.key if cache and plan and plan.mode != "bypass" and not fell_back else None
        if plan is not None and route.streams:
            headers[RESULT_HEADER] = "miss" if plan.mode != "bypass" else "bypass"
            obs.cache = headers[RESULT_HEADER]
        rag: JSON | None = getattr(http.state, "rag", None)
        if rag is not None:
            headers[RETRIEVAL_HEADER] = rag["status"]
            if rag["status"] != "ok":
                store_key = None  # an answer without its context is not that request's

        if request.stream:
            options = body.get("stream_options") or {}
            wants_usage = bool(options.get("include_usage"))
            body["stream_options"] = {**options, "include_usage": True}  # what settles limits
            used: list[JSON] = []
            assembler = Assembler() if store_key else None

            def fix(chunk: JSON) -> JSON | None:
                if assembler is not None:
                    assembler.add(chunk)
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
                entry = assembler.entry() if assembler is not None and error is None else None
                if cache is not None and store_key is not None and entry is not None:
                    entry["system_fingerprint"] = cleaning.fingerprint(target)
                    cache.store_soon(store_key, entry)

            def closed() -> None:  # the client left, or the stream never started
                ticket.finish(None)
                attempt.end(None, left=True)
                slot.release()
                obs.finish(499, error_type="client_closed_request")

            events = streaming.relay(stream, fix, request_id_of(http.scope), ended)
            return SSEResponse(events, headers=headers | SSE_HEADERS, on_close=closed)

        charged: int | None = None
        try:
            if route is EMBEDDINGS and plan is not None and plan.mode == "use":
                assert self.cached is not None
                answer, charged = await self.cached.embeddings(
                    target, body, affinity, http, prepared, headers
                )
            else:
                answer, _ = await run_or_cancel(
                    self.dispatcher.complete(target, route.path, body, affinity), http.receive
                )
        finally:
            slot.release()
        total = total_tokens(answer, ticket.reserved)
        ticket.finish(total if charged is None else charged)
        usage = answer.get("usage")
        schema = output_check.schema_of(body.get("response_format"))
        storable = store_key is not None
        if schema is not None:
            try:
                output_check.check_chat_output(answer, schema)
                headers[OUTPUT_VALID_HEADER] = "true"
            except InvalidModelOutput:
                if self.config.invalid_output == "reject":
                    raise
                headers[OUTPUT_VALID_HEADER] = "false"
                storable = False
        obs.finish(200, usage=usage if isinstance(usage, dict) else None)
        cleaned = route.clean(answer, requested, target)
        if rag is not None:
            cleaned["weir"] = {"retrieval": rag}
        if storable and cache is not None and store_key is not None and route.streams:
            cache.store_soon(store_key, cleaned)
        return JSONBytes(cleaned, headers=headers)

    async def embed_texts(self, model: str, texts: list[str], batch: int = 64) -> list[list[float]]:
        """Vectors for ``texts`` from ``model``, through its bulkhead and the embedding cache
        (what retrieval uses for ingest and queries)."""
        served = self.registry.resolve(model)
        if served.task != "embed":
            raise WrongTask(f"The model '{model}' is not an embedding model.", param="model")
        vectors: list[list[float]] = []
        for start in range(0, len(texts), batch):
            part = texts[start : start + batch]
            body: JSON = {"model": model, "input": part}
            slot = await self.dispatcher.admit(served)
            try:
                if self.cached is not None and self.cache_embeddings:
                    prepared = contract.Prepared(body, None, None)
                    answer, _ = await self.cached.embeddings(served, body, None, None, prepared, {})
                else:
                    answer, _ = await self.dispatcher.complete(served, EMBEDDINGS.path, body, None)
            finally:
                slot.release()
            data = sorted(answer.get("data") or [], key=lambda d: int(d.get("index", 0)))
            vectors += [list(d["embedding"]) for d in data]
        return vectors


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
