"""The canary gate: ``"ttft_p95<1.2x,errors<1%"`` parsed, and judged on measurements.

Terms, joined by commas, all of which must hold for a promotion:

- ``ttft_pNN < K x``: the canary's NN-th percentile time to first token (first content
  chunk of a stream; the whole answer otherwise) below K times the stable version's;
- ``ttft_pNN < N ms`` or ``N s``: below an absolute figure;
- ``errors < N %``: the canary's share of requests it failed (5xx, broken streams);
  ``errors < K x`` compares with the stable version's share.

Both versions are measured over the same window by the gateway itself.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from serving.rollout.tracker import Sample

_TERM = re.compile(
    r"^\s*(?P<metric>ttft_p(?P<q>\d{1,2}(?:\.\d+)?)|errors)\s*<\s*"
    r"(?P<value>\d+(?:\.\d+)?)\s*(?P<unit>x|%|ms|s)\s*$"
)


class GateSyntaxError(ValueError):
    pass


@dataclass(frozen=True)
class Term:
    metric: str  # "ttft" or "errors"
    quantile: float | None  # 0.95 for ttft_p95
    value: float
    unit: Literal["x", "%", "ms", "s"]

    def __str__(self) -> str:
        name = f"ttft_p{self.quantile * 100:g}" if self.quantile is not None else "errors"
        return f"{name}<{self.value:g}{self.unit}"


@dataclass(frozen=True)
class Figures:
    requests: int
    errors: int
    ttft_s: dict[float, float | None]  # quantile -> seconds (None: no successful request)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": round(self.error_rate, 4),
            **{
                f"ttft_p{q * 100:g}_ms": None if v is None else round(v * 1000, 1)
                for q, v in self.ttft_s.items()
            },
        }


@dataclass(frozen=True)
class Verdict:
    promote: bool
    reasons: list[str]  # one line per term (and the traffic check), with the figures
    canary: Figures
    stable: Figures


def parse(text: str) -> list[Term]:
    terms: list[Term] = []
    for part in text.split(","):
        match = _TERM.match(part)
        if match is None:
            raise GateSyntaxError(
                f"cannot read {part.strip()!r}: write terms like ttft_p95<1.2x, ttft_p99<800ms,"
                " errors<1%, joined by commas"
            )
        unit = match["unit"]
        if match["q"] is not None:
            quantile = float(match["q"]) / 100
            if not 0 < quantile < 1:
                raise GateSyntaxError(f"{part.strip()!r}: the percentile must be in 1..99")
            if unit == "%":
                raise GateSyntaxError(f"{part.strip()!r}: a latency takes x, ms or s, not %")
            terms.append(Term("ttft", quantile, float(match["value"]), unit))  # type: ignore[arg-type]
        else:
            if unit in ("ms", "s"):
                raise GateSyntaxError(f"{part.strip()!r}: errors take % or x")
            terms.append(Term("errors", None, float(match["value"]), unit))  # type: ignore[arg-type]
    if not terms:
        raise GateSyntaxError("no terms")
    return terms


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile; ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def figures(samples: list[Sample], quantiles: set[float]) -> Figures:
    times = [s.ttft_s for s in samples if s.ttft_s is not None]
    return Figures(
        requests=len(samples),
        errors=sum(s.error for s in samples),
        ttft_s={q: percentile(times, q) for q in sorted(quantiles)},
    )


def judge(
    terms: list[Term], canary: list[Sample], stable: list[Sample], min_requests: int
) -> Verdict:
    quantiles = {t.quantile for t in terms if t.quantile is not None} | {0.5}
    mine, theirs = figures(canary, quantiles), figures(stable, quantiles)
    reasons: list[str] = []
    promote = True
    if mine.requests < min_requests:
        promote = False
        reasons.append(f"canary served {mine.requests} requests, fewer than {min_requests}")
    for term in terms:
        ok, line = _check(term, mine, theirs)
        promote = promote and ok
        reasons.append(line)
    return Verdict(promote, reasons, mine, theirs)


def _check(term: Term, mine: Figures, theirs: Figures) -> tuple[bool, str]:
    if term.metric == "errors":
        rate = mine.error_rate
        if term.unit == "%":
            ok = rate * 100 < term.value
            return ok, f"{term}: canary errors {rate:.2%} ({'ok' if ok else 'fails'})"
        ok = rate <= 0 or rate < term.value * theirs.error_rate
        return ok, (
            f"{term}: canary errors {rate:.2%} vs stable {theirs.error_rate:.2%}"
            f" ({'ok' if ok else 'fails'})"
        )
    assert term.quantile is not None
    value = mine.ttft_s.get(term.quantile)
    if value is None:
        return False, f"{term}: no successful canary request to measure"
    if term.unit == "x":
        base = theirs.ttft_s.get(term.quantile)
        if base is None:
            return False, f"{term}: no successful stable request to compare with"
        ok = value < term.value * base
        return ok, (
            f"{term}: canary {value * 1000:.1f} ms vs stable {base * 1000:.1f} ms"
            f" = {value / base:.2f}x ({'ok' if ok else 'fails'})"
        )
    limit = term.value / 1000 if term.unit == "ms" else term.value
    ok = value < limit
    return ok, f"{term}: canary {value * 1000:.1f} ms ({'ok' if ok else 'fails'})"
