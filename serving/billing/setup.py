"""The gateway's meter (prices, budgets, ledger) from its settings."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry

from serving.billing.config import BillingConfig
from serving.billing.meter import Meter
from serving.ledger.config import LedgerConfig
from serving.ledger.writer import Ledger


def price_rows(config: BillingConfig) -> list[dict[str, Any]]:
    """The configured prices as the ledger's ``prices`` table records them."""
    now = time.time()
    rows = []
    for price in config.prices:
        prompt, completion, cached = price.per_million()
        rows.append(
            {
                "model": price.model, "version": price.version,
                "since": price.since.timestamp(), "prompt_per_m": prompt,
                "completion_per_m": completion, "cached_per_m": cached, "recorded": now,
            }
        )  # fmt: skip
    return rows


def make_meter(
    billing: BillingConfig, ledger: LedgerConfig, registry: CollectorRegistry | None
) -> Meter | None:
    """None when there is nothing to price and nothing to record."""
    if not ledger.enabled and not billing.prices:
        return None
    writer = (
        Ledger(
            ledger, prices_in_effect=price_rows(billing), registry=registry or CollectorRegistry()
        )
        if ledger.enabled
        else None
    )
    return Meter(billing, writer)
