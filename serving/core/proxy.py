"""The use case behind every OpenAI model route: resolve, check the contract, pick, call,
clean.

HTTP-free: the edge (``serving.http``) validates the body (``serving.protocol``), builds a
``Call`` (who asks, request id, pin, cache control, how to learn the client left) and
hands both here with the ``Route`` that says which engine path serves it, which task the
model must have, how the contract prepares it and how the answer is cleaned. ``handle``
returns an ``Answer`` (JSON or a stream, with headers); errors are raised, never returned.
What the request holds (limit ticket, bulkhead slot, attempt, observation) is a ``Lease``
ended exactly once. The engine call is cancelled the moment the client disconnects.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry.trace import Tracer

from models.engines.fleet import Fleet
from models.errors import EngineFailed
from models.registry import Registry, parse_name, public_name
from models.tokenizer import TokenCounter
from models.types import ServedVersion, Task, VersionKey
from serving import streaming
from serving.billing.meter import Meter
from serving.cache.entries import RESULT_HEADER, Assembler, extension, replay
from serving.cache.service import Cache
from serving.core import cleaning, contract, output_check, tools
from serving.core.answer import (
    SSE_HEADERS,
    VERSION_HEADER,
    Answer,
    JsonAnswer,
    StreamAnswer,
    total_tokens,
)
from serving.core.cached_calls import CachedCalls, CachePlan, VectorLookup
from serving.core.call import Call, never
from serving.core.disconnect import run_or_cancel
from serving.core.lease import CLIENT_LEFT, Lease
from serving.core.priority import ENGINE_PRIORITY, share_of
from serving.core.rag import RetrievalGate
from serving.errors import (
    BudgetExceeded,
    GatewayError,
    InvalidModelOutput,
    InvalidRequest,
    PermissionDenied,
    RateLimited,
    WrongTask,
    answered_by,
    spec_for,
)
from serving.limits.limiter import UNLIMITED_TICKET, Limiter, Ticket, Unlimited
from serving.limits.plan import plan, reservation_size
from serving.observe.metrics import Metrics
from serving.observe.record import Observation
from serving.observe.tracing import recording, span
from serving.protocol.requests import ModelRequest
from serving.rollout.tracker import VersionTracker
from serving.routing.bulkhead import Share, Slot
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


Charge = Callable[[JSON, int], int]  # (answer, tokens reserved) -> tokens to charge


@dataclass(frozen=True)
class Route:
    path: str
    task: Task | None  # the task the model must have; None: any model serves it
    prepare: Preparer
    clean: Cleaner
    streams: bool = True
    cached: bool = True  # whether the response (or embedding) cache may serve it
    charge: Charge = total_tokens  # what the limits charge for an answer
    upstream: str | None = None  # the engine's path when it is not ``path``

    @property
    def engine_path(self) -> str:
        return self.upstream or self.path


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


OutputCheck = Callable[[JSON], None]


def _output_checks(body: JSON) -> list[OutputCheck]:
    """What a chat answer to ``body`` is held to: its ``response_format`` schema and the
    parameters of its ``strict`` tools (each raises ``InvalidModelOutput``)."""
    checks: list[OutputCheck] = []
    schema = output_check.schema_of(body.get("response_format"))
    if schema is not None:
        checks.append(functools.partial(_check_schema, schema=schema))
    strict = tools.strict_schemas(body)
    if strict:
        checks.append(functools.partial(tools.check_tool_calls, strict=strict))
    return checks


def _check_schema(answer: JSON, schema: JSON) -> None:
    output_check.check_chat_output(answer, schema)


def _cut_off(answer: JSON) -> bool:
    """Whether a choice of ``answer`` ended at ``max_tokens`` (finish_reason "length")."""
    return any(c.get("finish_reason") == "length" for c in answer.get("choices") or ())


def _finished(answer: JSON) -> JSON:
    """``answer`` without its cut-off choices: their output is unfinished (its JSON cannot
    be whole), so it is passed on as OpenAI does, unchecked, with finish_reason "length"."""
    choices = [c for c in answer.get("choices") or () if c.get("finish_reason") != "length"]
    return {**answer, "choices": choices}


def _passes(checks: list[OutputCheck], answer: JSON) -> bool:
    try:
        for check in checks:
            check(answer)
    except (InvalidModelOutput, InvalidRequest):
        return False
    return True


class Proxy:
    def __init__(
        self,
        registry: Registry,
        dispatcher: Dispatcher,
        counters: Mapping[VersionKey, TokenCounter],
        config: ContractConfig,
        limiter: Limiter | None = None,
        model_tpm: Mapping[str, int] | None = None,
        metrics: Metrics | None = None,
        tracer: Tracer | None = None,
        log_requests: bool = True,
        cache: Cache | None = None,
        cache_embeddings: bool = True,
        rag: RetrievalGate | None = None,
        meter: Meter | None = None,
    ) -> None:
        self.rag = rag
        self.meter = meter  # prices, budgets, the usage ledger
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

    async def handle(self, route: Route, request: ModelRequest, call: Call) -> Answer:
        obs = Observation(
            self.metrics, route.path, bool(request.stream), call.request_id,
            call.caller.key_id, self.log_requests, self.tracker,
        )  # fmt: skip
        lease = Lease(obs, self.meter)
        try:
            answer = await self._handle(route, request, call, lease)
        except BaseException as exc:
            if lease.obs.chosen is not None:
                answered_by(exc, lease.obs.chosen)  # its error says which version, too
            spec = spec_for(exc)
            if isinstance(exc, RateLimited) and self.metrics is not None:
                self.metrics.limit_rejections.labels(exc.limit).inc()
            elif isinstance(exc, BudgetExceeded) and self.metrics is not None:
                self.metrics.budget_rejections.labels(exc.budget).inc()
            lease.end(spec.status if spec else 500, exc)
            raise
        if isinstance(answer, JsonAnswer):
            lease.end(answer.status)
        return answer  # a stream's lease ends when the stream does

    async def _handle(
        self, route: Route, request: ModelRequest, call: Call, lease: Lease
    ) -> Answer:
        if call.pin and "@" not in request.model:
            request.model = f"{request.model}@{call.pin}"  # a pinned version, by header
        requested = request.model
        if not call.caller.allows(public_name(requested)):  # an adapter is its own name
            # said before the registry is asked: no hint whether the model exists
            raise PermissionDenied("This API key may not use the requested model.", param="model")
        served = self.registry.resolve(requested, sticky=self._sticky(request, call))
        lease.obs.served(served.model, served.version)
        if route.task is not None and served.task != route.task:
            raise WrongTask(
                f"The model '{requested}' is {TASK_NAMES[served.task]}; "
                f"it does not serve {route.path}.",
                param="model",
            )
        if request.stream and not route.streams:
            raise InvalidRequest(f"{route.path} does not stream", param="stream")
        rag: JSON | None = None
        spec = extension(request.model_extra or {}).get("retrieval")
        if spec is not None:
            request, rag = await self._augment(route, request, call, spec)
        size = call.body_bytes if rag is None else None  # augmented: no longer that body
        prepared = await contract.prepare_async(
            route.prepare, request, self.counters.get(served.engine), self.config, size
        )
        lease.obs.asked(prepared.body)
        found = await self._cached_vectors(route, call, served, prepared)
        with span(self.tracer, "weir.limits"):
            n = getattr(request, "n", 1) or 1
            lease.ticket = await self._admit(call, served, prepared, n, found, lease)
        plan = (
            self.cached.plan(route.path, route is EMBEDDINGS, call, served, prepared)
            if self.cached and route.cached
            else None
        )
        if plan is not None and plan.mode == "use" and route.streams and self.cached:
            entry = await self.cached.hit(request, served, plan, lease)
            if entry is not None:
                return self._replay(request, served, prepared, entry, lease)
        target, prepared, fell_back = await self._target(route, request, call, served, prepared)
        share = share_of(request.model_extra, call)
        if self.dispatcher.schedules_by_priority(target):
            prepared.body["priority"] = ENGINE_PRIORITY[share.priority]
        lease.slot = await self._queue(target, share)
        headers = {VERSION_HEADER: target.version, **lease.ticket.headers}
        if fell_back:
            headers[FALLBACK_HEADER] = str(target.key)
            lease.obs.fell_back(target.model, target.version)
            if self.metrics is not None:
                self.metrics.fallbacks.labels(served.model, str(target.key)).inc()
        # a fallback's answer is not the requested version's: never stored under its key
        store_key = plan.key if self.cache and plan and plan.mode != "bypass" else None
        if fell_back:
            store_key = None
        if plan is not None and route.streams:
            headers[RESULT_HEADER] = "miss" if plan.mode != "bypass" else "bypass"
            lease.obs.cache = headers[RESULT_HEADER]
        if rag is not None:
            headers[RETRIEVAL_HEADER] = rag["status"]
            if rag["status"] != "ok":
                store_key = None  # an answer without its context is not that request's
        job = Job(route, requested, target, prepared, call, lease, headers, store_key, found)
        if request.stream:
            return await self._stream(job)
        return await self._complete(job, plan, rag)

    def _replay(
        self,
        request: ModelRequest,
        served: ServedVersion,
        prepared: contract.Prepared,
        entry: JSON,
        lease: Lease,
    ) -> Answer:
        """A stored answer as this request's answer: JSON, or replayed as a stream."""
        headers = {VERSION_HEADER: served.version, RESULT_HEADER: "hit", **lease.ticket.headers}
        if _output_checks(prepared.body):
            headers[OUTPUT_VALID_HEADER] = "true"  # only answers that conform are stored
        if not request.stream:
            return JsonAnswer(entry, headers)
        options = getattr(request, "stream_options", None)
        usage = entry.get("usage")
        wants_usage = bool(getattr(options, "include_usage", False)) and isinstance(usage, dict)
        return StreamAnswer(streaming.replayed(replay(entry, wants_usage)), headers | SSE_HEADERS)

    async def _queue(self, target: ServedVersion, share: Share) -> Slot:
        queued = time.perf_counter()
        slot = await self.dispatcher.admit(target, share)
        if self.metrics is not None:
            wait = time.perf_counter() - queued
            self.metrics.queue_wait.labels(target.model, target.version).observe(wait)
            self.metrics.child(
                self.metrics.tenant_wait, target.model, target.version, share.priority, share.label
            ).observe(wait)
        return slot

    async def _cached_vectors(
        self, route: Route, call: Call, served: ServedVersion, prepared: contract.Prepared
    ) -> VectorLookup | None:
        """An embedding request's cached vectors, looked up before admission (so that hits,
        which charge nothing, reserve nothing); None when the cache does not serve it."""
        if route is not EMBEDDINGS or self.cached is None:
            return None
        plan = self.cached.plan(route.path, True, call, served, prepared)
        if plan is None or plan.mode != "use":
            return None
        return await self.cached.lookup_vectors(served, prepared.body, call.caller.cache_scope)

    async def _admit(
        self,
        call: Call,
        served: ServedVersion,
        prepared: contract.Prepared,
        n: int,
        found: VectorLookup | None = None,
        lease: Lease | None = None,
    ) -> Ticket | Unlimited:
        tokens = reservation_size(prepared.prompt_tokens, prepared.max_tokens, n)
        if found is not None and prepared.counts and not (self.cache and self.cache.charge_hits):
            tokens = sum(prepared.counts[i] for i in found.missing)  # hits are not charged
        budgets = []
        if self.meter is not None and lease is not None:  # money: priced, budgets checked
            completion = (prepared.max_tokens or 0) * n
            key = call.caller.key
            budgets = self.meter.admit(lease, key, served, tokens - completion, completion)
        if self.limiter is None:
            return UNLIMITED_TICKET
        name = served.public  # an adapter has its own model budget
        checks = plan(call.caller.key, name, tokens, self.model_tpm.get(name)) + budgets
        return await self.limiter.admit(name, checks)

    async def _augment(
        self, route: Route, request: ModelRequest, call: Call, spec: Any
    ) -> tuple[ModelRequest, JSON]:
        """RAG: the request with retrieved passages in its messages (or as it was), and
        what retrieval found (the response's ``weir.retrieval``)."""
        if route is not CHAT or self.rag is None:
            raise InvalidRequest(
                "weir.retrieval works on chat completions, with retrieval on.",
                param="weir.retrieval",
            )
        with span(self.tracer, "weir.retrieval"):
            asked = request.model_dump(exclude_unset=True)
            messages, found = await self.rag.augment(call.caller, asked, spec)
        if messages is None:
            return request, found
        return type(request).model_validate({**asked, "messages": messages}), found

    def _sticky(self, request: ModelRequest, call: Call) -> str | None:
        """What keeps a caller on one version of a split, if the model asks for it."""
        model = self.registry.model(parse_name(request.model)[0])
        if model is None or model.sticky == "none":
            return None
        if model.sticky == "key":
            caller = call.caller
            return caller.key.id if caller.key else caller.static_key
        messages = getattr(request, "messages", None) or []
        first = next((m for m in messages if getattr(m, "role", None) == "user"), None)
        opening = getattr(first, "content", None) if first is not None else None
        user = getattr(request, "user", None)
        return f"{user or ''}\x00{opening}" if (user or opening) else None

    async def _target(
        self,
        route: Route,
        request: ModelRequest,
        call: Call,
        served: ServedVersion,
        prepared: contract.Prepared,
    ) -> tuple[ServedVersion, contract.Prepared, bool]:
        """``served``, or the first of its fallbacks that can take the request when it can't
        (and that the caller's key may use: a fallback answers as that model)."""
        if self.dispatcher.available(served) or served.adapter is not None:
            return served, prepared, False  # an adapter's answer has no stand-in
        for fallback in self.registry.fallbacks(served.model):
            if fallback.task != served.task or not self.dispatcher.available(fallback):
                continue
            if not call.caller.allows(fallback.model):
                continue
            try:
                again = await contract.prepare_async(
                    route.prepare, request, self.counters.get(fallback.key), self.config
                )
            except GatewayError:
                continue  # e.g. the prompt does not fit the fallback's context
            return fallback, again, True
        return served, prepared, False  # nothing better: queue for it or fail as it fails

    def _affinity(self, served: ServedVersion, body: JSON) -> str | None:
        chars = self.dispatcher.affinity_chars(served.model)
        return None if chars is None else prompt_prefix(body, chars)

    async def _stream(self, job: Job) -> StreamAnswer:
        """Open the engine's stream (first chunk in hand) and relay it; the lease ends
        when the stream does, or when the client leaves."""
        body, lease, target = job.prepared.body, job.lease, job.target
        body.pop("weir", None)  # our extension never reaches the engine
        options = body.get("stream_options") or {}
        wants_usage = bool(options.get("include_usage"))
        body["stream_options"] = {**options, "include_usage": True}  # what settles limits
        assembler = Assembler(chat=job.route is CHAT) if job.store_key else None
        checks = _output_checks(body)
        obs, clean, requested = lease.obs, job.route.clean, job.requested

        def fix(chunk: JSON) -> JSON | None:
            if assembler is not None:
                assembler.add(chunk)
            usage = chunk.get("usage")
            if isinstance(usage, dict) and isinstance(usage.get("total_tokens"), int):
                lease.used(usage["total_tokens"], usage)
            if _has_content(chunk):
                obs.content()
            if not wants_usage:
                if usage and not chunk.get("choices"):
                    return None
                chunk.pop("usage", None)
            return clean(chunk, requested, target)

        stream, lease.attempt = await run_or_cancel(
            self.dispatcher.open_stream(
                target, job.route.engine_path, body, self._affinity(target, body)
            ),
            job.call.disconnected,
        )

        def ended(error: BaseException | None) -> None:
            if error is None and lease.tokens is None:
                lease.used(lease.ticket.reserved)  # the engine did not say: what was reserved
            lease.end(200, error)
            entry = assembler.entry() if assembler is not None and error is None else None
            if entry is not None and checks and (_cut_off(entry) or not _passes(checks, entry)):
                # an answer that broke its schema is never stored, nor one cut off by
                # max_tokens (it was not checked: a hit says x-weir-output-valid: true)
                entry = None
            if entry is not None and self.cache is not None and job.store_key is not None:
                entry["system_fingerprint"] = cleaning.fingerprint(target)
                self.cache.store_soon(job.store_key, entry)

        async def closed() -> None:  # last, however the stream ended
            # A relay that never ran (the client left before the first event) closed
            # nothing: close the engine stream here, which makes vLLM abort (idempotent).
            await stream.aclose()
            lease.end(CLIENT_LEFT)  # the client left, unless the relay ended it first

        events = streaming.relay(stream, fix, job.call.request_id, ended)
        return StreamAnswer(events, job.headers | SSE_HEADERS, on_close=closed)

    async def _complete(self, job: Job, plan: CachePlan | None, rag: JSON | None) -> JsonAnswer:
        body, lease, target, headers = job.prepared.body, job.lease, job.target, job.headers
        body.pop("weir", None)  # our extension never reaches the engine
        affinity = self._affinity(target, body)
        if job.route is EMBEDDINGS and plan is not None and plan.mode == "use" and self.cached:
            answer, charged = await self.cached.embeddings(
                target, body, affinity, job.call.disconnected, job.prepared, headers,
                scope=job.call.caller.cache_scope, found=job.found,
            )  # fmt: skip
        else:
            answer, _ = await run_or_cancel(
                self.dispatcher.complete(target, job.route.engine_path, body, affinity),
                job.call.disconnected,
            )
            charged = job.route.charge(answer, lease.ticket.reserved)
        usage = answer.get("usage")
        lease.used(charged, usage if isinstance(usage, dict) else None)
        storable = job.store_key is not None
        checks = _output_checks(body)
        checked = answer
        if checks and _cut_off(answer):
            # cut off by max_tokens: its unfinished choices are not checked (OpenAI answers
            # them as they are), so the answer is neither said valid nor stored
            storable = False
            checked = _finished(answer)
        if checks:
            try:
                for check in checks:
                    check(checked)
                if checked is answer:
                    headers[OUTPUT_VALID_HEADER] = "true"
            except InvalidModelOutput:
                if self.config.invalid_output == "reject":
                    raise
                headers[OUTPUT_VALID_HEADER] = "false"
                storable = False
        cleaned = job.route.clean(answer, job.requested, target)
        if rag is not None:
            cleaned["weir"] = {"retrieval": rag}
        if storable and self.cache is not None and job.store_key and job.route.streams:
            self.cache.store_soon(job.store_key, cleaned)
        return JsonAnswer(cleaned, headers)

    async def embed_texts(
        self, model: str, texts: list[str], scope: str, batch: int = 64
    ) -> list[list[float]]:
        """Vectors for ``texts`` from ``model``, through its bulkhead and the embedding cache
        under ``scope`` (the cache scope of the caller they are for: what retrieval uses
        for ingest and queries)."""
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
                    answer, _ = await self.cached.embeddings(
                        served, body, None, never, prepared, {}, scope=scope
                    )
                else:
                    answer, _ = await self.dispatcher.complete(served, EMBEDDINGS.path, body, None)
            finally:
                slot.release()
            data = sorted(answer.get("data") or [], key=lambda d: int(d.get("index", 0)))
            if len(data) != len(part):
                raise EngineFailed(f"engine returned {len(data)} embeddings for {len(part)}")
            vectors += [list(d["embedding"]) for d in data]
        return vectors


@dataclass(frozen=True, slots=True)
class Job:
    """A request ready for its engine: where it goes, what it holds, what it answers with."""

    route: Route
    requested: str  # the model as the client named it (what answers say)
    target: ServedVersion
    prepared: contract.Prepared
    call: Call
    lease: Lease
    headers: dict[str, str]
    store_key: str | None  # where its answer goes in the response cache, if anywhere
    found: VectorLookup | None = None  # an embedding request's vectors found in the cache


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
