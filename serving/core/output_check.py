"""Checks an answer against the ``response_format`` the client asked for: one returned,
or one assembled from a stream before it is stored."""

from __future__ import annotations

import json
from typing import Any

import jsonschema

from serving.errors import InvalidModelOutput

JSON = dict[str, Any]


def schema_of(response_format: JSON | None) -> JSON | None:
    """The JSON Schema to hold the content to, ``{}`` for json_object, None for text."""
    if not response_format:
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema") if isinstance(spec, dict) else None
        return schema if isinstance(schema, dict) else {}
    return None


def check_chat_output(answer: JSON, schema: JSON) -> None:
    """Raise ``InvalidModelOutput`` unless every choice's content is JSON matching ``schema``."""
    for choice in answer.get("choices") or ():
        content = (choice.get("message") or {}).get("content")
        index = choice.get("index", 0)
        try:
            value = json.loads(content or "")
        except ValueError as exc:
            raise InvalidModelOutput(
                f"choice {index}: the model's output is not JSON, as response_format requires."
            ) from exc
        errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(value), key=str)
        if errors:
            where = "/".join(str(p) for p in errors[0].absolute_path) or "(root)"
            raise InvalidModelOutput(
                f"choice {index}: the model's output breaks the requested schema at {where}:"
                f" {errors[0].message}"
            )


def conforms(answer: JSON, schema: JSON) -> bool:
    """Would ``check_chat_output`` accept ``answer``? (A streamed answer before it is stored.)"""
    try:
        check_chat_output(answer, schema)
    except InvalidModelOutput:
        return False
    return True
