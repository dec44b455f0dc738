"""Prices in effect: which price a model version (or adapter) has at a time, and costs.

Money is counted in integer nano-dollars (``NANO`` per dollar) everywhere it is added up:
Redis counters, the ledger, reports; a request's cost is rounded up to the next one.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from serving.billing.config import PriceConfig

NANO = 1_000_000_000  # nano-dollars per dollar


def dollars(nano: int | float) -> float:
    return nano / NANO


def to_nano(amount: float) -> int:
    return round(amount * NANO)


@dataclass(frozen=True, slots=True)
class Price:
    """Nano-dollars per token: prompt, completion, cached prompt (prefix-cache hits)."""

    prompt: float
    completion: float
    cached: float
    since: float  # unix time it took effect

    @classmethod
    def of(cls, config: PriceConfig) -> Price:
        prompt, completion, cached = config.per_million()
        return cls(prompt * 1e3, completion * 1e3, cached * 1e3, config.since.timestamp())

    def cost(self, prompt: int, completion: int, cached: int = 0) -> int:
        """What ``prompt`` tokens (``cached`` of them prefix-cache hits) and ``completion``
        tokens cost, in nano-dollars, rounded up."""
        cached = min(max(cached, 0), prompt)
        raw = (prompt - cached) * self.prompt + cached * self.cached + completion * self.completion
        return math.ceil(raw - 1e-6) if raw > 0 else 0

    def worst_case(self, prompt: int, completion: int) -> int:
        """The most a request can cost: every prompt token at the higher prompt rate and
        every completion at its maximum (``max_tokens`` x ``n``)."""
        rate = max(self.prompt, self.cached)
        raw = prompt * rate + completion * self.completion
        return math.ceil(raw - 1e-6) if raw > 0 else 0


class PriceBook:
    """Every configured price, by model and version, in order of ``since``."""

    def __init__(self, prices: list[PriceConfig]) -> None:
        table: dict[tuple[str, str], list[Price]] = {}
        for config in prices:
            table.setdefault((config.model, config.version), []).append(Price.of(config))
        for entries in table.values():
            entries.sort(key=lambda p: p.since)
            sinces = [p.since for p in entries]
            if len(set(sinces)) != len(sinces):
                raise ValueError("two prices for one model version take effect at the same time")
        self._table = table
        self._since = {k: [p.since for p in v] for k, v in table.items()}

    def __repr__(self) -> str:
        return f"PriceBook({len(self._table)} model versions)"

    def __bool__(self) -> bool:
        return bool(self._table)

    def price(self, names: tuple[str, ...], version: str, at: float) -> Price | None:
        """The price in effect at ``at`` for the first of ``names`` (the public name, then
        the model) that has one for ``version``, else for every version (``*``)."""
        for name in names:
            for which in (version, "*"):
                key = (name, which)
                entries = self._table.get(key)
                if entries is None:
                    continue
                i = bisect.bisect_right(self._since[key], at)
                if i:
                    return entries[i - 1]
        return None
