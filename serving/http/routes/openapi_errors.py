"""Error responses declared on routes, so the OpenAPI schema is honest about them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    error: ErrorDetail


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorBody} for status in statuses}


GENERATION_ERRORS = errors(400, 401, 403, 404, 413, 429, 500, 502, 503, 504)
