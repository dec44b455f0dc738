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
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from opentelemetry.trace import SpanKind, Tracer

from models.config import ModelConfig, RoutingConfig
from models.engines.client import EngineStream
from models.engines.fleet import Fleet, Replica
from models.errors import (
    EngineError,
    EngineFailed,
    EngineRejected,
    EngineTimeout,
    EngineUnavailable,
)
from models.types import ServedVersion
from serving.observe.tracing import recording, span
from serving.routing.backoff import ExponentialBackoff
from serving.routing.bulkhead import Bulkhead, Slot
from serving.routing.retry_budget import RetryBudget
from serving.routing.router import LeastOutstanding, eligible

JSON = dict[str, Any]
T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]


def is_fault(exc: BaseException | None) -> bool:
    """Does ``exc`` say the replica is in trouble (not the client, not the request)?"""
    return isinstance(exc, EngineError) and not isinstance(exc, EngineRejected)


@dataclass(frozen=True)
class Deadlines:
    ttft_s: float
    total_s: float


@dataclass
class Attempt:
    """A request on one replica, until it ends; ``end`` is idempotent."""

    replica: Replica
    _open: bool = field(default=True, init=False)

    def end(self, error: BaseException | None, *, left: bool = False) -> None:
        if not self._open:
            return
        self._open = False
        self.replica.outstanding -= 1
        if left:
            self.replica.breaker.forget()
        else:
            self.replica.breaker.record(is_fault(error))


class PrimedStream:
    """An engine stream whose first chunk has been read; enforces the total deadline."""

    def __init__(
        self, stream: EngineStream, rest: AsyncIterator[bytes], first: bytes, deadline: float
    ) -> None:
        self._stream = stream
        self._rest = rest
        self._first = first
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
        closer = getattr(self._rest, "aclose", None)
        if closer is not None:
            await closer()
        await self._stream.aclose()


class Dispatcher:
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
    ) -> None:
        self.fleet = fleet
        self.sleep = sleep
        self.tracer = recording(tracer)
        self.on_retry = on_retry
        self.routing: dict[str, RoutingConfig] = {}
        self.deadlines: dict[str, Deadlines] = {}
        self.bulkheads: dict[str, Bulkhead] = {}
        self.budgets: dict[str, RetryBudget] = {}
        self.backoffs: dict[str, ExponentialBackoff] = {}
        self.routers: dict[str, LeastOutstanding] = {}
        self.clock = clock
        self.defaults = defaults
        for model in models:
            self.configure(model)
        self.adopt(fleet.replicas)

    def configure(self, model: ModelConfig) -> None:
        """Routing state for a model and a bulkhead per version (new versions on deploy)."""
        routing = model.routing
        if model.name not in self.routing:
            defaults = self.defaults
            self.routing[model.name] = routing
            self.deadlines[model.name] = Deadlines(
                model.timeouts.ttft_s or defaults.ttft_s, model.timeouts.total_s or defaults.total_s
            )
            self.budgets[model.name] = RetryBudget(
                routing.retry_budget,
                routing.retry_budget_window_s,
                routing.retry_budget_floor,
                self.clock,
            )
            self.backoffs[model.name] = ExponentialBackoff(
                routing.backoff_base_s, routing.backoff_cap_s, jitter=True
            )
            self.routers[model.name] = LeastOutstanding(routing.affinity_slack)
        for version in model.versions:
            key = f"{model.name}@{version.version}"
            if key not in self.bulkheads:
                self.bulkheads[key] = Bulkhead(
                    key, routing.max_in_flight, routing.max_queue, routing.queue_timeout_s
                )

    def adopt(self, replicas: list[Replica]) -> None:
        """Give replicas their model's breaker settings and this dispatcher's clock."""
        for replica in replicas:
            own = self.routing.get(replica.key.model)
            if own is not None:
                replica.breaker.failures_to_open = own.breaker_failures
                replica.breaker.open_s = own.breaker_open_s
                replica.breaker.probes = own.breaker_probes
                replica.breaker.clock = self.clock

    def __repr__(self) -> str:
        return f"Dispatcher(bulkheads={list(self.bulkheads)!r})"

    def affinity_chars(self, model: str) -> int | None:
        """How many prompt characters steer ``model``'s requests to one replica (None: off)."""
        routing = self.routing.get(model)
        if routing is None or not routing.prefix_affinity:
            return None
        return routing.affinity_prefix_chars

    def available(self, served: ServedVersion) -> bool:
        """Could ``served`` take a request now: a place in its bulkhead and a live replica?"""
        bulkhead = self.bulkheads.get(served.key)
        if bulkhead is not None and bulkhead.full():
            return False
        return bool(eligible(self.fleet.replicas_of(served)))

    async def admit(self, served: ServedVersion) -> Slot:
        return await self.bulkheads[served.key].acquire()

    async def complete(
        self, served: ServedVersion, path: str, body: JSON, affinity: str | None
    ) -> tuple[JSON, Replica]:
        async def call(replica: Replica) -> JSON:
            return await replica.engine.complete(path, body | {"model": replica.served_name})

        answer, attempt = await self._with_retries(served, affinity, call)
        attempt.end(None)
        return answer, attempt.replica

    async def open_stream(
        self, served: ServedVersion, path: str, body: JSON, affinity: str | None
    ) -> tuple[PrimedStream, Attempt]:
        """A stream whose first chunk is in hand; the caller ends the ``Attempt``."""
        limits = self.deadlines[served.model]

        async def call(replica: Replica) -> PrimedStream:
            deadline = time.monotonic() + limits.total_s
            stream: EngineStream | None = None
            try:
                async with asyncio.timeout(limits.ttft_s):
                    stream = await replica.engine.open_stream(
                        path, body | {"model": replica.served_name}
                    )
                    rest = aiter(stream)
                    first = await anext(rest)
            except TimeoutError:
                if stream is not None:
                    await stream.aclose()
                raise EngineTimeout(
                    f"engine {replica.key} sent no first token within {limits.ttft_s:g}s",
                    engine=str(replica.key),
                ) from None
            except StopAsyncIteration:
                await _close(stream)
                raise EngineFailed(
                    f"engine {replica.key} ended the stream before its first chunk",
                    engine=str(replica.key),
                ) from None
            except BaseException:
                await _close(stream)
                raise
            return PrimedStream(stream, rest, first, deadline)

        return await self._with_retries(served, affinity, call)

    async def _with_retries(
        self,
        served: ServedVersion,
        affinity: str | None,
        call: Callable[[Replica], Awaitable[T]],
    ) -> tuple[T, Attempt]:
        routing = self.routing[served.model]
        budget = self.budgets[served.model]
        budget.record_request()
        tried: set[int] = set()
        failures = 0
        while True:
            attempt = Attempt(self._choose(served, affinity, tried))
            attempt.replica.outstanding += 1
            attempt.replica.requests += 1
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
                if not is_fault(exc) or failures >= routing.retries or not budget.spend():
                    raise
                failures += 1
                if self.on_retry is not None:
                    self.on_retry(served.model)
                tried.add(id(attempt.replica))
                await self.sleep(self.backoffs[served.model].compute(failures))
                continue
            except BaseException:
                attempt.end(None, left=True)
                raise
            return result, attempt

    def _choose(self, served: ServedVersion, affinity: str | None, tried: set[int]) -> Replica:
        replicas = self.fleet.replicas_of(served)
        router = self.routers[served.model]
        candidates = eligible(replicas)
        fresh = [r for r in candidates if id(r) not in tried]
        while fresh or candidates:
            pool = fresh or candidates
            replica = router.choose(pool, affinity)
            if replica.breaker.allow():
                return replica
            fresh = [r for r in fresh if r is not replica]
            candidates = [r for r in candidates if r is not replica]
        unhealthy = sum(not r.healthy for r in replicas)
        open_ = sum(r.healthy and not r.breaker.available() for r in replicas)
        raise EngineUnavailable(
            f"no engine can take requests for {served.key} ({len(replicas)} replicas:"
            f" {unhealthy} unhealthy, {open_} with an open circuit); retry shortly",
            engine=served.key,
        )


async def _close(stream: EngineStream | None) -> None:
    if stream is not None:
        await stream.aclose()
