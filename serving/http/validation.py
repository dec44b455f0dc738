"""Turns pydantic/FastAPI validation errors into one ``InvalidRequest`` naming the field."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi.exceptions import RequestValidationError

from serving.errors import InvalidRequest


def param_path(loc: Sequence[Any]) -> str | None:
    """``("body", "messages", 0, "role")`` to ``messages[0].role``."""
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or None


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _is_field(part: str) -> bool:
    """pydantic puts union member tags (``str``, ``list[int]``) in ``loc``; skip them."""
    return part not in _TYPE_TAGS and not any(c in part for c in "[]()-")


def invalid_request_from(exc: RequestValidationError) -> InvalidRequest:
    return invalid_request_from_errors(exc.errors())


def invalid_request_from_errors(errors: Sequence[Any]) -> InvalidRequest:
    """The first of pydantic's ``errors()`` as one ``InvalidRequest`` naming its field."""
    if not errors:
        return InvalidRequest("Invalid request body.")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return InvalidRequest("The request body is not valid JSON.")
    if first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):
        return InvalidRequest("The request body is empty; a JSON object is required.")
    loc = [p for p in first.get("loc", ()) if isinstance(p, int) or _is_field(str(p))]
    param = param_path(loc)
    message = str(first.get("msg", "invalid value"))
    return InvalidRequest(f"{param}: {message}" if param else message, param=param)
