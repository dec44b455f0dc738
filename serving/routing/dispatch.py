"""Getting a request to a replica and back: bulkhead, router, breakers, retries, timeouts.

``Dispatcher.admit`` takes a slot in the version's bulkhead (or says 503 at once).
``complete`` and ``open_stream`` pick a replica, call it, and on an engine fault
(connection error, 5xx, timeout) record it on that replica's breaker and try another,
with full-jitter back-off, while the retry budget allows: all before the first byte goes
to the client. A stream is "open" when its first chunk has arrived within the model's
time-to-first-token limit; the response starts only then, so a stream that fails before
its first token is retried like any other request, and one that fails later ends with an
error event (never retried). Client errors (4xx) and client disconnects never count
against a replica.
"""

from __future__ import annotations

import asyncio
import functools
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from opentelemetry.trace import SpanKind, Tracer

from models.config import ModelConfig
from models.engines.client import EngineStream
from models.engines.fleet import Fleet, Replica
from models.errors import (
    EngineError,
    EngineFailed,
    EngineRejected,
    EngineTimeout,
    EngineUnavailable,
)
from models.types import ServedVersion, VersionKey
from serving.observe.tracing import recording, span
from serving.routing.breaker import CircuitBreaker
from serving.routing.bulkhead import ANYONE, Bulkhead, Share, Slot
from serving.routing.kv_routing import KvRouting
from serving.routing.load import ReplicaLoad
from serving.routing.router import Candidate, RouteKey, eligible
from serving.routing.served import Deadlines, ServedModel

__all__ = ["Attempt", "Deadlines", "Dispatcher", "PrimedStream", "is_fault"]

JSON = dict[str, Any]
T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]
QueueWatcher = Callable[[VersionKey, str, str, int], None]  # version, priority, tenant, queued


class AdapterHolder(Protocol):
    """Which replicas hold which LoRA adapters (``serving.adapters``)."""

    def holds(self, replica: Replica, adapter: str) -> bool: ...

    def path_of(self, base: VersionKey, adapter: str) -> str | None:
        """Where ``base``'s engines load ``adapter`` from (None: it does not serve it)."""
        ...

    async def ensure(self, replica: Replica, adapter: str) -> None:
        """Load ``adapter`` on ``replica`` unless it holds it; ``AdapterLoadFailed``."""
        ...


def is_fault(exc: BaseException | None) -> bool:
    """Does ``exc`` say the replica is in trouble (not the client, not the request)?"""
    return isinstance(exc, EngineError) and not isinstance(exc, EngineRejected)


@dataclass
class Attempt:
    """A request on one replica, until it ends; ``end`` is idempotent."""

    replica: Replica
    load: ReplicaLoad
    _open: bool = field(default=True, init=False)

    def end(self, error: BaseException | None, *, left: bool = False) -> None:
        if not self._open:
            return
        self._open = False
        self.load.outstanding -= 1
        if left:
            self.load.breaker.forget()
        else:
            self.load.breaker.record(is_fault(error))


class PrimedStream:
    """An engine stream whose first chunk has been read; enforces the total deadline."""

    def __init__(
        self, stream: EngineStream, rest: AsyncIterator[bytes], first: bytes, deadline: float
    ) -> None:
        self._stream = stream
        self._rest = rest
        self._first = first
        self._closed = False
        self._deadline = deadline

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        yield self._first
        async for payload in self._rest:
            if time.monotonic() > self._deadline:
                raise EngineTimeout("the stream ran past the model's total time limit")
            yield payload

    async def aclose(self) -> None:
        """Close the engine stream (which makes vLLM abort it); once, however often called."""
        if self._closed:
            return
        self._closed = True
        closer = getattr(self._rest, "aclose", None)
        if closer is not None:
            await closer()
        await self._stream.aclose()


class Dispatcher:
    """Routing state: a ``ServedModel`` per model, a ``ReplicaLoad`` per replica.

    A replica's load is made the first time routing meets it, with its model's breaker
    settings (``adopt`` makes it at once), and goes when the replica does: replicas
    join and leave the fleet (deploys, DNS discovery) without telling the dispatcher.
    """

    def __init__(
        self,
        fleet: Fleet,
        models: list[ModelConfig],
        defaults: Deadlines,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        tracer: Tracer | None = None,
        on_retry: Callable[[str], None] | None = None,
        kv: KvRouting | None = None,
    ) -> None:
        self.fleet = fleet
        self.sleep = sleep
        self.tracer = recording(tracer)
        self.on_retry = on_retry
        self.clock = clock
        self.defaults = defaults
        self.kv = kv  # the engines' KV events, for models routed kv_aware
        self.models: dict[str, ServedModel] = {}
        self.adapters: AdapterHolder | None = None  # set when a version serves adapters
        self._loads: weakref.WeakKeyDictionary[Replica, ReplicaLoad] = weakref.WeakKeyDictionary()
        self._queue_watcher: QueueWatcher | None = None
        for model in models:
            self.configure(model)
        self.adopt(fleet.replicas)

    def configure(self, model: ModelConfig) -> None:
        """Routing state for a model and a bulkhead per version (new versions on deploy)."""
        if self.kv is not None:  # a deployed version: its engine flags for block hashing
            self.kv.configure(model)
        served = self.models.get(model.name)
        if served is None:
            self.models[model.name] = ServedModel.of(model, self.defaults, self.clock, self.kv)
        else:
            served.add_versions(model)
        self._watch_queues()

    def observe_queues(self, observer: QueueWatcher) -> None:
        """Tell ``observer`` each version's line per (priority, tenant) as it changes."""
        self._queue_watcher = observer
        self._watch_queues()

    def _watch_queues(self) -> None:
        watcher = self._queue_watcher
        if watcher is None:
            return
        for key, bulkhead in self.bulkheads().items():
            if bulkhead.observer is None:
                bulkhead.observer = functools.partial(watcher, key)

    def adopt(self, replicas: list[Replica]) -> None:
        """Routing state for replicas joining, with their model's breaker settings."""
        for replica in replicas:
            load = self.load_of(replica)
            served = self.models.get(replica.key.model)
            if served is not None:
                served.fit(load.breaker)

    def load_of(self, replica: Replica) -> ReplicaLoad:
        """``replica``'s breaker and request counts (made on first sight)."""
        load = self._loads.get(replica)
        if load is None:
            served = self.models.get(replica.key.model)
            breaker = CircuitBreaker(clock=self.clock)
            load = ReplicaLoad(served.fit(breaker) if served is not None else breaker)
            self._loads[replica] = load
        return load

    def bulkheads(self) -> dict[VersionKey, Bulkhead]:
        """Every served version's bulkhead."""
        return {key: b for served in self.models.values() for key, b in served.bulkheads.items()}

    def __repr__(self) -> str:
        return f"Dispatcher(models={list(self.models)!r})"

    def affinity_chars(self, model: str) -> int | None:
        """How many prompt characters steer ``model``'s requests to one replica (None: off)."""
        served = self.models.get(model)
        return None if served is None else served.affinity_chars()

    def available(self, served: ServedVersion) -> bool:
        """Could ``served`` take a request now: a place in its bulkhead and a live replica?"""
        own = self.models.get(served.engine.model)  # an alias's adapter: its base's bulkhead
        bulkhead = None if own is None else own.bulkheads.get(served.engine)
        if bulkhead is not None and bulkhead.full():
            return False
        return any(
            r.healthy and self.load_of(r).breaker.available()
            for r in self.fleet.replicas_of(served)
        )

    async def admit(self, served: ServedVersion, share: Share = ANYONE) -> Slot:
        return await self.models[served.engine.model].bulkheads[served.engine].acquire(share)

    def schedules_by_priority(self, served: ServedVersion) -> bool:
        """Do ``served``'s engines run vLLM's priority scheduling (``priority`` in bodies)?"""
        own = self.models.get(served.engine.model)
        return own is not None and served.engine in own.priority_scheduled

    async def complete(
        self, served: ServedVersion, path: str, body: JSON, affinity: str | None
    ) -> tuple[JSON, Replica]:
        async def call(replica: Replica) -> JSON:
            name = served.adapter or replica.served_name
            return await replica.engine.complete(path, body | {"model": name})

        key = await self._route_key(served, body, affinity)
        answer, attempt = await self._with_retries(served, key, call)
        attempt.end(None)
        return answer, attempt.replica

    async def open_stream(
        self, served: ServedVersion, path: str, body: JSON, affinity: str | None
    ) -> tuple[PrimedStream, Attempt]:
        """A stream whose first chunk is in hand; the caller ends the ``Attempt``."""
        limits = self.models[served.model].deadlines
        own = self.models.get(served.engine.model)
        bulkhead = None if own is None else own.bulkheads.get(served.engine)

        async def call(replica: Replica) -> PrimedStream:
            started = time.monotonic()
            deadline = started + limits.total_s
            stream: EngineStream | None = None
            try:
                async with asyncio.timeout(limits.ttft_s):
                    stream = await replica.engine.open_stream(
                        path, body | {"model": served.adapter or replica.served_name}
                    )
                    rest = aiter(stream)
                    first = await anext(rest)
                if bulkhead is not None:  # the engine's time to first chunk: its queue
                    bulkhead.sample(time.monotonic() - started)
            except TimeoutError:
                failure: EngineError = EngineTimeout(
                    f"engine {replica.key} sent no first token within {limits.ttft_s:g}s",
                    engine=str(replica.key),
                )
            except StopAsyncIteration:
                failure = EngineFailed(
                    f"engine {replica.key} ended the stream before its first chunk",
                    engine=str(replica.key),
                )
            except BaseException:
                await _close(stream)
                raise
            else:
                return PrimedStream(stream, rest, first, deadline)
            await _close(stream)
            raise failure from None

        return await self._with_retries(served, await self._route_key(served, body, affinity), call)

    async def _route_key(self, served: ServedVersion, body: JSON, affinity: str | None) -> RouteKey:
        """What the router goes by: the prompt's blocks for a ``kv_aware`` model whose
        replicas' events are followed, else the prompt prefix (``prefix_hash``) or nothing."""
        kv = self.kv
        if kv is None or served.model not in kv.models:
            return affinity
        lora_path = None
        if served.adapter is not None and self.adapters is not None:
            lora_path = self.adapters.path_of(served.engine, served.adapter)
        return await kv.prompt_key(served, body, lora_path)

    async def _with_retries(
        self,
        served: ServedVersion,
        affinity: RouteKey,
        call: Callable[[Replica], Awaitable[T]],
    ) -> tuple[T, Attempt]:
        model = self.models[served.model]
        budget = model.budget
        budget.record_request()
        tried: set[Replica] = set()
        failures = 0
        while True:
            attempt = Attempt(*self._choose(model, served, affinity, tried))
            if served.adapter is not None and self.adapters is not None:
                try:  # a replica that cannot load it is passed over, its breaker untouched
                    await self.adapters.ensure(attempt.replica, served.adapter)
                except EngineUnavailable:
                    tried.add(attempt.replica)
                    if tried >= set(self.fleet.replicas_of(served)):
                        raise
                    continue
            attempt.load.outstanding += 1
            attempt.load.requests += 1
            try:
                with span(
                    self.tracer, "weir.engine", kind=SpanKind.CLIENT, record_exception=False
                ) as current:
                    if self.tracer is not None:
                        current.set_attribute("weir.replica", str(attempt.replica.key))
                        current.set_attribute("weir.attempt", failures + 1)
                    result = await call(attempt.replica)
            except EngineError as exc:
                attempt.end(exc)
                if not is_fault(exc) or failures >= model.routing.retries or not budget.spend():
                    raise
                failures += 1
                if self.on_retry is not None:
                    self.on_retry(served.model)
                tried.add(attempt.replica)
                await self.sleep(model.backoff.compute(failures))
                continue
            except BaseException:
                attempt.end(None, left=True)
                raise
            return result, attempt

    def _choose(
        self,
        model: ServedModel,
        served: ServedVersion,
        affinity: RouteKey,
        tried: set[Replica],
    ) -> Candidate:
        replicas = self.fleet.replicas_of(served)
        pool = [(r, self.load_of(r)) for r in replicas]
        candidates = eligible(pool)
        if served.adapter is not None and self.adapters is not None:
            adapter, holder = served.adapter, self.adapters  # prefer replicas that hold it
            candidates = [c for c in candidates if holder.holds(c[0], adapter)] or candidates
        fresh = [c for c in candidates if c[0] not in tried]
        while fresh or candidates:
            chosen = model.router.choose(fresh or candidates, affinity)
            if chosen[1].breaker.allow():
                return chosen
            fresh = [c for c in fresh if c is not chosen]
            candidates = [c for c in candidates if c is not chosen]
        unhealthy = sum(not r.healthy for r in replicas)
        open_ = sum(r.healthy and not load.breaker.available() for r, load in pool)
        raise EngineUnavailable(
            f"no engine can take requests for {served.key} ({len(replicas)} replicas:"
            f" {unhealthy} unhealthy, {open_} with an open circuit); retry shortly",
            engine=str(served.key),
        )


async def _close(stream: EngineStream | None) -> None:
    if stream is not None:
        await stream.aclose()
