"""The proxy's cache side: which requests may use the cache, serving hits, and
embeddings looked up per input (only the misses go to the engine).

Both are scoped like the caller (``Caller.cache_scope``): a tenant never gets, nor learns
through ``x-weir-cache-hits``, what another tenant's requests put in the cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from opentelemetry.trace import Tracer

from models.errors import EngineFailed
from models.types import ServedVersion
from serving.cache.entries import (
    NOT_OUTPUT,
    RESULT_HEADER,
    Mode,
    embedding_key,
    mode_for,
    replayable,
    response_key,
)
from serving.cache.service import Cache
from serving.core import cleaning, contract
from serving.core.answer import total_tokens
from serving.core.call import Call, Disconnected
from serving.core.disconnect import run_or_cancel
from serving.core.lease import Lease
from serving.observe.metrics import Metrics
from serving.observe.tracing import span
from serving.protocol.requests import ModelRequest
from serving.routing.dispatch import Dispatcher

JSON = dict[str, Any]
EMBEDDINGS_PATH = "/v1/embeddings"
# an embedding request's fields that never change its vectors (the rest are in its keys)
NOT_VECTOR = NOT_OUTPUT | {"input", "dimensions", "encoding_format"}


@dataclass(frozen=True)
class VectorLookup:
    """An embedding request's inputs, their cache keys and the vectors found (None: a
    miss), looked up once, before admission: only the misses' tokens are reserved."""

    version: ServedVersion
    inputs: list[Any]
    keys: list[str]
    vectors: list[Any]

    @property
    def missing(self) -> list[int]:
        return [i for i, v in enumerate(self.vectors) if v is None]


@dataclass(frozen=True)
class CachePlan:
    mode: Mode
    key: str  # empty when the mode is bypass, and for embeddings (keyed per input)


class CachedCalls:
    def __init__(
        self,
        cache: Cache,
        dispatcher: Dispatcher,
        tracer: Tracer | None,
        metrics: Metrics | None,
        embeddings: bool,
    ) -> None:
        self.cache = cache
        self.dispatcher = dispatcher
        self.tracer = tracer
        self.metrics = metrics
        self.cache_embeddings = embeddings

    def __repr__(self) -> str:
        return f"CachedCalls(cache={self.cache!r})"

    def plan(
        self,
        path: str,
        embeddings: bool,
        call: Call,
        served: ServedVersion,
        prepared: contract.Prepared,
    ) -> CachePlan | None:
        """How this request may use the cache; None when the cache is off for it."""
        key = call.caller.key
        if key is not None and not key.cache:
            return None
        body = prepared.body
        control = call.cache_control
        if embeddings:
            float_vectors = body.get("encoding_format") in (None, "float")
            use = self.cache_embeddings and float_vectors and control != "bypass"
            return CachePlan("use" if use else "bypass", "")
        mode = mode_for(body, control)
        if mode == "bypass":
            self.count("response", "bypass")
            return CachePlan(mode, "")
        scope = call.caller.cache_scope
        return CachePlan(mode, response_key(scope, served.model, served.version, path, body))

    async def hit(
        self,
        request: ModelRequest,
        served: ServedVersion,
        plan: CachePlan,
        lease: Lease,
    ) -> JSON | None:
        """The stored answer for this request, or None: a miss. A hit ends the lease (the
        tokens it charges, if any) and is named as the client named the model."""
        with span(self.tracer, "weir.cache") as current:
            entry = await self.cache.lookup(plan.key)
            current.set_attribute("weir.cache.hit", entry is not None)
        if entry is None or (request.stream and not replayable(entry)):
            self.count("response", "miss")
            return None
        self.count("response", "hit")
        lease.used(total_tokens(entry, 0) if self.cache.charge_hits else 0)
        lease.obs.cache = "hit"
        lease.end(200)  # no engine tokens were used: none reported to the metrics
        entry["model"] = request.model
        entry["system_fingerprint"] = cleaning.fingerprint(served)
        return entry

    async def lookup_vectors(self, target: ServedVersion, body: JSON, scope: str) -> VectorLookup:
        """The cached vectors of an embedding request's inputs for ``target``; ``scope`` is
        whose vectors these are (the caller's cache scope)."""
        raw = body["input"]
        single = isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int))
        inputs: list[Any] = [raw] if single else list(raw)
        dims = body.get("dimensions")
        # every other field that can change a vector (truncate_prompt_tokens, normalize,
        # ...) is hashed too, with the scope: [scope, fields, text] as JSON, unambiguous
        fields = {k: v for k, v in body.items() if k not in NOT_VECTOR}
        keys = [embedding_key(target.model, target.version, dims, [scope, fields, text])
                for text in inputs]  # fmt: skip
        with span(self.tracer, "weir.cache") as current:
            vectors = await self.cache.lookup_vectors(keys)
            current.set_attribute("weir.cache.hits", sum(v is not None for v in vectors))
        return VectorLookup(target, inputs, keys, vectors)

    async def embeddings(
        self,
        target: ServedVersion,
        body: JSON,
        affinity: str | None,
        disconnected: Disconnected,
        prepared: contract.Prepared,
        headers: dict[str, str],
        *,
        scope: str,
        found: VectorLookup | None = None,
    ) -> tuple[JSON, int]:
        """Embeddings with cached vectors reused: one lookup (``found``, when it was made
        for ``target`` before admission), only the misses to the engine. Returns the answer
        and the tokens to charge (the misses' only)."""
        if found is None or found.version != target:
            found = await self.lookup_vectors(target, body, scope)
        inputs, keys, vectors = found.inputs, found.keys, list(found.vectors)
        missing = found.missing
        engine_tokens = 0
        model = body.get("model")
        if missing:
            sub = body | {"input": [inputs[i] for i in missing]}
            call = self.dispatcher.complete(target, EMBEDDINGS_PATH, sub, affinity)
            answer, _ = await run_or_cancel(call, disconnected)
            data = sorted(answer.get("data") or [], key=lambda d: int(d.get("index", 0)))
            if len(data) != len(missing):
                raise EngineFailed(f"engine returned {len(data)} embeddings for {len(missing)}")
            for i, item in zip(missing, data, strict=True):
                vectors[i] = item["embedding"]
            self.cache.store_vectors_soon([(keys[i], data[n]["embedding"])
                                           for n, i in enumerate(missing)])  # fmt: skip
            engine_tokens = total_tokens(answer, 0)
            model = answer.get("model", model)
        hits = len(inputs) - len(missing)
        self.count("embedding", "hit", hits)
        self.count("embedding", "miss", len(missing))
        headers[RESULT_HEADER] = "hit" if not missing else ("miss" if not hits else "partial")
        headers["x-weir-cache-hits"] = f"{hits}/{len(inputs)}"
        prompt = prepared.prompt_tokens if prepared.prompt_tokens is not None else engine_tokens
        answer = {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": v}
                     for i, v in enumerate(vectors)],
            "model": model,
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
        }  # fmt: skip
        charged = prompt if self.cache.charge_hits else engine_tokens
        return answer, charged

    def count(self, kind: str, result: str, n: int = 1) -> None:
        if self.metrics is not None and n:
            self.metrics.child(self.metrics.cache, kind, result).inc(n)
