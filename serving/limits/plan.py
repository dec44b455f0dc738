"""What one request must pass: the list of checks built from its key, model and size.

A check names a counter (``scope``), its kind, its limit and window, and how much this
request takes from it. Stores evaluate the whole list atomically: all pass and are
charged, or nothing is charged and the first that failed is reported.

Kinds:
- ``requests``: a count per fixed window (requests per minute).
- ``tokens``: tokens per fixed window; reserved at admission, settled to real usage.
- ``model_tokens``: like ``tokens``, but its limit is the runtime value an operator set
  for the model (``weir limits set``), falling back to the configured one; counted even
  when unlimited so that a limit set mid-window starts from the truth.
- ``concurrency``: requests in flight, each holding a slot until settled or its lease ends.
- ``budget``: nano-dollars per UTC day (``window_s`` = ``DAY``), per UTC calendar month
  (``MONTH``) or in all (``TOTAL``, never resets); reserved at admission as the request's
  worst-case cost and settled to its real cost (``serving.billing``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from serving.keys.records import KeyRecord

Kind = Literal["requests", "tokens", "model_tokens", "concurrency", "budget"]
UNLIMITED = -1
MINUTE = 60
DAY = 86_400
MONTH = -1  # a budget's window: the UTC calendar month
TOTAL = 0  # a budget's window: none (a fixed total)
PREFIX = "weir:{rl}:"  # one hash tag: every limit key in one Redis Cluster slot


@dataclass(frozen=True)
class Check:
    name: str  # rpm, tpm, tokens_per_day, max_concurrency, model_tpm
    scope: str  # the counter's key, without the window suffix
    kind: Kind
    limit: int  # UNLIMITED: counted, never refused
    window_s: int  # 0 for concurrency
    amount: int

    @property
    def counts_tokens(self) -> bool:
        return self.kind in ("tokens", "model_tokens")

    @property
    def counts_money(self) -> bool:
        return self.kind == "budget"


def reservation_size(prompt_tokens: int | None, max_tokens: int | None, n: int) -> int:
    """Tokens to hold at admission: the exact prompt plus every completion at its maximum.

    ``prompt_tokens`` is every prompt's, and ``max_tokens`` one choice's over every prompt
    (``contract.Prepared``): ``["hi"] * 100`` with ``max_tokens`` 100 and ``n`` 2 holds the
    hundred prompts plus 100 * 100 * 2 tokens.
    """
    return (prompt_tokens or 0) + (max_tokens or 0) * n


def plan(key: KeyRecord | None, model: str, tokens: int, model_tpm: int | None) -> list[Check]:
    checks: list[Check] = []
    if key is not None:
        scope = f"{PREFIX}key:{key.id}:"
        if key.rpm is not None:
            checks.append(Check("rpm", scope + "rpm", "requests", key.rpm, MINUTE, 1))
        if key.tpm is not None:
            checks.append(Check("tpm", scope + "tpm", "tokens", key.tpm, MINUTE, tokens))
        if key.tokens_per_day is not None:
            checks.append(
                Check("tokens_per_day", scope + "tpd", "tokens", key.tokens_per_day, DAY, tokens)
            )
        if key.max_concurrency is not None:
            checks.append(
                Check("max_concurrency", scope + "conc", "concurrency", key.max_concurrency, 0, 1)
            )
    limit = UNLIMITED if model_tpm is None else model_tpm
    checks.append(
        Check("model_tpm", f"{PREFIX}model:{model}:tpm", "model_tokens", limit, MINUTE, tokens)
    )
    return checks
