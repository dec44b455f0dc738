"""``Meter``: what a request may cost (its budget checks at admission) and what it did
cost (at its lease's end: the settlement of its budgets and its ledger row).

What a finished request is charged (``cost_basis`` in the ledger):
- ``usage``: the engine's usage (prompt, completion, prefix-cache hits) at the price in
  effect when it was admitted;
- ``partial``: the client left mid-stream before the usage chunk: its prompt plus one
  completion token per content chunk it was sent, never more than was reserved;
- ``reserved``: the engine said nothing of usage: its tokens at the dearer rate, never
  more than its worst case;
- ``none``: nothing was generated (refused, failed before an answer, a cache hit that is
  not charged); ``unpriced``: no price is configured for its model version.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from models.types import ServedVersion
from serving.billing.budgets import budget_checks, team_of
from serving.billing.config import BillingConfig
from serving.billing.prices import Price, PriceBook
from serving.keys.records import KeyRecord
from serving.ledger.writer import Ledger, new_row_id
from serving.limits.plan import Check

if TYPE_CHECKING:
    from serving.core.lease import Lease

Clock = Callable[[], float]


class Meter:
    def __init__(
        self, config: BillingConfig, ledger: Ledger | None = None, clock: Clock = time.time
    ) -> None:
        self.config = config
        self.prices = PriceBook(config.prices)
        self.ledger = ledger
        self.clock = clock

    def __repr__(self) -> str:
        return f"Meter(prices={self.prices!r}, ledger={self.ledger!r})"

    def price(self, served: ServedVersion) -> Price | None:
        names = (served.public, served.model) if served.public != served.model else (served.model,)
        return self.prices.price(names, served.version, self.clock())

    def admit(
        self,
        lease: Lease,
        key: KeyRecord | None,
        served: ServedVersion,
        prompt_tokens: int,
        completion_max: int,
    ) -> list[Check]:
        """Price the request on its lease (kept to its end) and the budget checks it must
        pass: its worst-case cost against every budget of its key and team."""
        price = self.price(served)
        lease.price = price
        lease.team = team_of(key)
        lease.prompt_tokens = prompt_tokens
        if price is None:
            return []
        lease.worst_cost = price.worst_case(prompt_tokens, completion_max)
        return budget_checks(key, self.config.teams, lease.worst_cost)

    def cost(self, lease: Lease, left: bool) -> tuple[int, str]:
        price = lease.price
        if price is None:
            return 0, "unpriced"
        usage = lease.usage
        if usage is not None and isinstance(usage.get("prompt_tokens"), int):
            completion = usage.get("completion_tokens")
            cost = price.cost(
                usage["prompt_tokens"],
                completion if isinstance(completion, int) else 0,
                cached_tokens(usage),
            )
            return cost, "usage"
        if left:
            chunks = lease.obs.chunks
            if not chunks:
                return 0, "none"
            partial = price.cost(lease.prompt_tokens, chunks)
            return min(partial, lease.worst_cost), "partial"
        if not lease.tokens:
            return 0, "none"
        dearer = max(price.prompt, price.completion, price.cached)
        return min(int(lease.tokens * dearer + 0.999999), lease.worst_cost), "reserved"

    def record(self, lease: Lease, status: int, error: str | None, cost: int, basis: str) -> None:
        """The ledger row of a finished request (tokens as the metrics count them)."""
        ledger = self.ledger
        if ledger is None:
            return
        obs = lease.obs
        usage = None if status == 499 else lease.usage
        prompt, completion = _int(usage, "prompt_tokens"), _int(usage, "completion_tokens")
        ledger.record(
            (
                new_row_id(), self.clock(), obs.request_id, obs.key_id, lease.team,
                obs.model, obs.version, obs.route, obs.stream, status, error, prompt,
                completion, cached_tokens(usage) if usage else 0, cost, basis,
                (time.perf_counter() - obs.started) * 1000,
            )
        )  # fmt: skip


def cached_tokens(usage: dict[str, Any]) -> int:
    details = usage.get("prompt_tokens_details")
    value = details.get("cached_tokens") if isinstance(details, dict) else None
    return value if isinstance(value, int) else 0


def _int(usage: dict[str, Any] | None, name: str) -> int:
    value = (usage or {}).get(name)
    return value if isinstance(value, int) else 0
