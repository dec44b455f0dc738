"""What the dispatcher keeps for one served model: its routing settings, deadlines,
retry budget, back-off, router, and a bulkhead per version.

Made when the model is first configured; a deploy adds its new versions' bulkheads.
The settings of a model already served stay as they were first configured.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from models.config import ModelConfig, RoutingConfig
from models.engines.backoff import ExponentialBackoff
from models.types import VersionKey
from serving.routing.breaker import CircuitBreaker
from serving.routing.bulkhead import Bulkhead
from serving.routing.retry_budget import RetryBudget
from serving.routing.router import Router, make_router

if TYPE_CHECKING:
    from serving.routing.kv_routing import KvRouting


@dataclass(frozen=True)
class Deadlines:
    ttft_s: float
    total_s: float


@dataclass
class ServedModel:
    name: str
    routing: RoutingConfig
    deadlines: Deadlines
    budget: RetryBudget
    backoff: ExponentialBackoff
    router: Router
    clock: Callable[[], float] = field(repr=False)
    bulkheads: dict[VersionKey, Bulkhead] = field(default_factory=dict)
    # versions whose engines run vLLM's --scheduling-policy priority
    priority_scheduled: set[VersionKey] = field(default_factory=set)

    @classmethod
    def of(
        cls,
        model: ModelConfig,
        defaults: Deadlines,
        clock: Callable[[], float],
        kv: KvRouting | None = None,
    ) -> ServedModel:
        routing = model.routing
        timeouts = model.timeouts
        served = cls(
            name=model.name,
            routing=routing,
            deadlines=Deadlines(
                timeouts.ttft_s or defaults.ttft_s, timeouts.total_s or defaults.total_s
            ),
            budget=RetryBudget(
                routing.retry_budget,
                routing.retry_budget_window_s,
                routing.retry_budget_floor,
                clock,
            ),
            backoff=ExponentialBackoff(routing.backoff_base_s, routing.backoff_cap_s, jitter=True),
            router=make_router(model.name, routing, kv),
            clock=clock,
        )
        served.add_versions(model)
        return served

    def add_versions(self, model: ModelConfig) -> None:
        """A bulkhead for each of ``model``'s versions that has none yet."""
        routing = model.routing
        for version in model.versions:
            key = VersionKey(model.name, version.version)
            if key not in self.bulkheads:
                self.bulkheads[key] = Bulkhead(
                    str(key), routing.max_in_flight, routing.max_queue, routing.queue_timeout_s,
                    fair=routing.fair_queueing, max_tenant_queue=routing.max_tenant_queue,
                    window_s=routing.fair_window_s, adaptive=routing.adaptive_in_flight,
                    min_in_flight=routing.min_in_flight, tolerance=routing.ttft_tolerance,
                    clock=self.clock,
                )  # fmt: skip
            if _priority_scheduled(version.engine_args):
                self.priority_scheduled.add(key)

    def fit(self, breaker: CircuitBreaker) -> CircuitBreaker:
        """Give ``breaker`` this model's settings and clock."""
        breaker.failures_to_open = self.routing.breaker_failures
        breaker.open_s = self.routing.breaker_open_s
        breaker.probes = self.routing.breaker_probes
        breaker.clock = self.clock
        return breaker

    def affinity_chars(self) -> int | None:
        """How many prompt characters steer requests to one replica (None: off)."""
        routing = self.routing
        on = routing.prefix_affinity or routing.strategy == "prefix_hash"
        return routing.affinity_prefix_chars if on else None


def _priority_scheduled(args: list[str]) -> bool:
    """Do these engine arguments turn on vLLM's priority scheduling?"""
    joined = " ".join(args).replace("=", " ").split()
    return ("--scheduling-policy", "priority") in itertools.pairwise(joined)
