"""OpenAI's ``x-ratelimit-*`` headers from the standings of a decision."""

from __future__ import annotations

import math
from collections.abc import Iterable

from serving.limits.store import Standing

REQUEST_CHECKS = ("rpm",)
TOKEN_CHECKS = ("tpm", "tokens_per_day", "model_tpm")


def duration(seconds: float) -> str:
    """Go-style durations as OpenAI writes them: ``20ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return f"{max(math.ceil(seconds * 1000), 0)}ms"
    minutes, rest = divmod(seconds, 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


def _tightest(standings: Iterable[Standing], names: tuple[str, ...]) -> Standing | None:
    limited = [s for s in standings if s.check.name in names and s.limit >= 0]
    return min(limited, key=lambda s: (s.remaining, -s.reset_s), default=None)


def ratelimit_headers(standings: Iterable[Standing]) -> dict[str, str]:
    """``-requests`` from the rpm limit, ``-tokens`` from the token limit with least left."""
    standings = list(standings)
    headers: dict[str, str] = {}
    for suffix, names in (("requests", REQUEST_CHECKS), ("tokens", TOKEN_CHECKS)):
        standing = _tightest(standings, names)
        if standing is None:
            continue
        headers[f"x-ratelimit-limit-{suffix}"] = str(standing.limit)
        headers[f"x-ratelimit-remaining-{suffix}"] = str(standing.remaining)
        headers[f"x-ratelimit-reset-{suffix}"] = duration(standing.reset_s)
    return headers
