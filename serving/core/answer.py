"""What every answer path shares: the JSON response class, header names, token totals."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

VERSION_HEADER = "x-weir-model-version"
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class JSONBytes(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def total_tokens(answer: dict[str, Any], fallback: int) -> int:
    """What the engine says the request used; ``fallback`` if it does not say."""
    usage = answer.get("usage")
    total = usage.get("total_tokens") if isinstance(usage, dict) else None
    return total if isinstance(total, int) else fallback
