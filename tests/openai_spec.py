"""Validate our responses against OpenAI's published OpenAPI description.

The spec lives in ``../shared/spec/openai-openapi.yaml`` beside the checkout (override
with ``WEIR_OPENAI_SPEC``). It is OpenAPI 3.1 but still uses 3.0's ``nullable: true`` in
places; we rewrite that to JSON Schema before validating.

One schema is added: ``CompletionStreamChunk``. The spec names ``CreateCompletionResponse``
as the event of a completions stream too, but its ``finish_reason`` is not nullable, while
OpenAI (and vLLM) send ``null`` in every chunk but the last; the added schema is
``CreateCompletionResponse`` with that one field nullable, nothing else changed.
"""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

ROOT = Path(__file__).resolve().parents[1]
URI = "urn:openai-openapi"


def spec_path() -> Path:
    override = os.environ.get("WEIR_OPENAI_SPEC")
    return Path(override) if override else ROOT.parent / "shared" / "spec" / "openai-openapi.yaml"


def _nullable(node: Any) -> Any:
    if isinstance(node, dict):
        node = {k: _nullable(v) for k, v in node.items()}
        if node.pop("nullable", False):
            return {"anyOf": [node, {"type": "null"}]}
        return node
    if isinstance(node, list):
        return [_nullable(v) for v in node]
    return node


@functools.cache
def _registry() -> Registry[Any]:
    path = spec_path()
    if not path.is_file():
        raise FileNotFoundError(f"OpenAI spec not found at {path}; set WEIR_OPENAI_SPEC")
    with path.open() as handle:
        document = _nullable(yaml.load(handle, Loader=yaml.CSafeLoader))
    schemas = document["components"]["schemas"]
    chunk = copy.deepcopy(schemas["CreateCompletionResponse"])
    choice = chunk["properties"]["choices"]["items"]["properties"]
    choice["finish_reason"] = {"anyOf": [choice["finish_reason"], {"type": "null"}]}
    schemas["CompletionStreamChunk"] = chunk
    resource = Resource.from_contents(document, default_specification=DRAFT202012)
    registry: Registry[Any] = Registry().with_resource(URI, resource)
    return registry


def validate(schema_name: str, instance: Any) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``instance`` matches the named schema."""
    validator = jsonschema.Draft202012Validator(
        {"$ref": f"{URI}#/components/schemas/{schema_name}"}, registry=_registry()
    )
    validator.validate(instance)


@functools.cache
def _stream_event_schemas() -> dict[str, str]:
    """Each Responses stream event's ``type`` -> the name of its schema in the spec (the
    ``ResponseStreamEvent`` union's members, by their ``type`` enum)."""
    contents = _registry().contents(URI)
    schemas = contents["components"]["schemas"]
    found: dict[str, str] = {}
    for member in schemas["ResponseStreamEvent"]["anyOf"]:
        name = member["$ref"].rsplit("/", 1)[1]
        kinds = schemas[name].get("properties", {}).get("type", {}).get("enum") or []
        for kind in kinds:
            found[kind] = name
    return found


def validate_response_event(event: Any) -> str:
    """Validate one Responses stream event against ``ResponseStreamEvent`` and against the
    one member schema its ``type`` names (the union alone would let an event pass as any
    member). Returns that schema's name; raises ``jsonschema.ValidationError``."""
    kind = event.get("type") if isinstance(event, dict) else None
    name = _stream_event_schemas().get(kind) if isinstance(kind, str) else None
    if name is None:
        raise jsonschema.ValidationError(f"no ResponseStreamEvent has type {event!r:.80}")
    validate("ResponseStreamEvent", event)
    validate(name, event)
    return name
