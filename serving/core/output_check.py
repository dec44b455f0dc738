"""Checks an answer against the ``response_format`` the client asked for: one returned,
or one assembled from a stream before it is stored.

A schema comes from the client, so it is held to what the gateway can check safely:

- ``check_request_schema`` (when the request arrives) refuses with 400 a schema over
  ``MAX_SCHEMA_BYTES`` serialized or nested deeper than ``MAX_SCHEMA_DEPTH``, one that is
  not a valid Draft 2020-12 schema, a ``$ref`` that is not local (``#...``) or that points
  nowhere, a loop of references that never reaches into the instance (``{"$ref": "#"}``),
  and a ``pattern`` the regex engine cannot compile.
- The check itself resolves references in a registry that refuses to retrieve anything
  (no network, no disk, whatever the schema says), matches ``pattern`` and
  ``patternProperties`` with the ``regex`` module under a time budget, and gives the
  whole answer ``CHECK_BUDGET_S`` of CPU: an answer that cannot be checked within it, or
  nested too deeply to check, is reported as invalid output (never claimed valid, never
  stored), so a hostile schema costs the event loop at most that long.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any, NoReturn

import jsonschema
import regex
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError
from jsonschema.validators import extend
from referencing import Registry
from referencing.exceptions import NoSuchResource, Unresolvable
from referencing.jsonschema import DRAFT202012

from serving.errors import InvalidModelOutput, InvalidRequest

JSON = dict[str, Any]

MAX_SCHEMA_BYTES = 32 * 1024  # the schema serialized as compact JSON
MAX_SCHEMA_DEPTH = 32  # objects and arrays nested in the schema document
CHECK_BUDGET_S = 0.25  # one answer's check, all its choices and patterns together
MAX_MESSAGE_CHARS = 300  # of a validation message quoted in a 502

ACCEPTED_CACHED = 256  # schemas that passed, by their JSON (clients resend theirs)

PARAM = "response_format.json_schema.schema"


class _OutOfTime(Exception):
    """The answer's check spent its budget."""


class _BadPattern(Exception):
    """A ``pattern`` the regex engine cannot compile (caught at request time normally)."""


# The metaschema check costs about 0.1 ms per subschema (a schema at the size limit:
# tens of ms), so the schemas that passed are remembered, least recently used first out.
_ACCEPTED: OrderedDict[str, None] = OrderedDict()

_DEADLINE: ContextVar[float] = ContextVar("weir_output_check_deadline", default=0.0)


def _refuse(uri: str) -> NoReturn:
    """The registry's retrieve: nothing outside the schema is ever fetched or read."""
    raise NoSuchResource(ref=uri)  # type: ignore[call-arg]


_LOCAL_ONLY: Registry[Any] = Registry(retrieve=_refuse)  # type: ignore[call-arg]


def _tick() -> float:
    """Seconds left of this check's budget; raises once it is spent."""
    left = _DEADLINE.get() - time.monotonic()
    if left <= 0:
        raise _OutOfTime
    return left


def _search(pattern: str, text: str) -> bool:
    try:
        return regex.search(pattern, text, timeout=_tick()) is not None
    except TimeoutError as exc:
        raise _OutOfTime from exc
    except regex.error as exc:
        raise _BadPattern(pattern) from exc


# jsonschema's own keywords call ``re.search`` (backtracking, no time limit): these four
# are its implementations with ``_search`` in its place.


def _pattern(validator: Any, patrn: str, instance: Any, schema: JSON) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not _search(patrn, instance):
        yield ValidationError(f"{instance!r} does not match {patrn!r}")


def _pattern_properties(
    validator: Any, patterns: JSON, instance: Any, schema: JSON
) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for k, v in instance.items():
            if _search(pattern, k):
                yield from validator.descend(v, subschema, path=k, schema_path=pattern)


def _additional(instance: JSON, schema: JSON) -> list[str]:
    properties = schema.get("properties", {})
    patterns = list(schema.get("patternProperties", {}))
    return [
        key
        for key in instance
        if key not in properties and not any(_search(p, key) for p in patterns)
    ]


def _additional_properties(
    validator: Any, additional: Any, instance: Any, schema: JSON
) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    extras = _additional(instance, schema)
    if validator.is_type(additional, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], additional, path=extra)
    elif not additional and extras:
        listed = ", ".join(repr(each) for each in sorted(extras))
        if "patternProperties" in schema:
            patterns = ", ".join(repr(each) for each in sorted(schema["patternProperties"]))
            verb = "does" if len(extras) == 1 else "do"
            yield ValidationError(f"{listed} {verb} not match any of the regexes: {patterns}")
        else:
            verb = "was" if len(extras) == 1 else "were"
            yield ValidationError(
                f"Additional properties are not allowed ({listed} {verb} unexpected)"
            )


def _valid(errors: Iterator[ValidationError]) -> bool:
    return next(errors, None) is None


def _evaluated_keys(validator: Any, instance: JSON, schema: Any) -> set[str]:
    """The keys of ``instance`` that ``schema`` evaluates (for unevaluatedProperties)."""
    if validator.is_type(schema, "boolean"):
        return set()
    _tick()
    keys: set[str] = set()
    for keyword in ("$ref", "$dynamicRef"):
        ref = schema.get(keyword)
        if ref is not None:
            resolved = validator._resolver.lookup(ref)
            here = validator.evolve(schema=resolved.contents, _resolver=resolved.resolver)
            keys |= _evaluated_keys(here, instance, resolved.contents)
    properties = schema.get("properties")
    if validator.is_type(properties, "object"):
        keys |= properties.keys() & instance.keys()
    for keyword in ("additionalProperties", "unevaluatedProperties"):
        if (subschema := schema.get(keyword)) is not None:
            keys |= {k for k, v in instance.items() if _valid(validator.descend(v, subschema))}
    for pattern in schema.get("patternProperties", {}):
        keys |= {k for k in instance if _search(pattern, k)}
    for key, subschema in schema.get("dependentSchemas", {}).items():
        if key in instance:
            keys |= _evaluated_keys(validator, instance, subschema)
    for keyword in ("allOf", "oneOf", "anyOf"):
        for subschema in schema.get(keyword, []):
            if _valid(validator.descend(instance, subschema)):
                keys |= _evaluated_keys(validator, instance, subschema)
    if "if" in schema:
        if validator.evolve(schema=schema["if"]).is_valid(instance):
            keys |= _evaluated_keys(validator, instance, schema["if"])
            if "then" in schema:
                keys |= _evaluated_keys(validator, instance, schema["then"])
        elif "else" in schema:
            keys |= _evaluated_keys(validator, instance, schema["else"])
    return keys


def _unevaluated_properties(
    validator: Any, unevaluated: Any, instance: Any, schema: JSON
) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    evaluated = _evaluated_keys(validator, instance, schema)
    bad = [
        key
        for key in instance
        if key not in evaluated
        and not _valid(validator.descend(instance[key], unevaluated, path=key, schema_path=key))
    ]
    if bad:
        listed = ", ".join(repr(each) for each in sorted(bad))
        verb = "was" if len(bad) == 1 else "were"
        if unevaluated is False:
            yield ValidationError(
                f"Unevaluated properties are not allowed ({listed} {verb} unexpected)"
            )
        else:
            yield ValidationError(
                "Unevaluated properties are not valid under the given schema"
                f" ({listed} {verb} unevaluated and invalid)"
            )


Keyword = Callable[[Any, Any, Any, JSON], Iterator[ValidationError] | None]


def _budgeted(keyword: Keyword) -> Keyword:
    """Every keyword first checks the answer's budget: a schema whose references fan out
    (``anyOf`` of the same ``$ref`` at each level) stops when the budget does."""

    def check(validator: Any, value: Any, instance: Any, schema: JSON) -> Iterator[ValidationError]:
        _tick()
        yield from keyword(validator, value, instance, schema) or ()

    return check


_OWN: dict[str, Keyword] = {
    "pattern": _pattern,
    "patternProperties": _pattern_properties,
    "additionalProperties": _additional_properties,
    "unevaluatedProperties": _unevaluated_properties,
}
_KEYWORDS: dict[str, Keyword] = dict(Draft202012Validator.VALIDATORS) | _OWN
_Checker: Any = extend(  # type: ignore[no-untyped-call]
    Draft202012Validator, {name: _budgeted(keyword) for name, keyword in _KEYWORDS.items()}
)


# ---------------------------------------------------------------- when the request arrives


def _refuse_schema(message: str, param: str) -> NoReturn:
    raise InvalidRequest(f"response_format's schema {message}", param=param)


def _measure(schema: JSON, param: str) -> str:
    """Depth first, without recursion (a deep document must not raise RecursionError),
    then the size of the schema serialized; returns that serialization."""
    stack: list[tuple[Any, int]] = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            _refuse_schema(f"is nested deeper than {MAX_SCHEMA_DEPTH} levels.", param)
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    text = json.dumps(schema, separators=(",", ":"))
    if len(text) > MAX_SCHEMA_BYTES:
        _refuse_schema(
            f"is {len(text)} bytes as JSON; at most {MAX_SCHEMA_BYTES} are allowed.", param
        )
    return text


# Keywords whose subschemas apply to the same instance (a reference loop through these
# never ends) and those whose subschemas apply to a part of it (a loop through these ends
# with the instance).
_IN_PLACE_ONE = ("not", "if", "then", "else")
_IN_PLACE_MANY = ("allOf", "anyOf", "oneOf")
_IN_PLACE_MAP = ("dependentSchemas",)
_INTO_ONE = (
    "items",
    "contains",
    "additionalProperties",
    "propertyNames",
    "unevaluatedItems",
    "unevaluatedProperties",
)
_INTO_MANY = ("prefixItems",)
_INTO_MAP = ("properties", "patternProperties")
_HOLDERS = ("$defs", "definitions")


def _walk_references(schema: JSON, param: str) -> None:
    """Every ``$ref`` is local and resolves without retrieval; every pattern compiles;
    no chain of references and in-place applicators comes back to where it started.

    Walks the schema positions first; a reference into anything else (a value under an
    unknown keyword) is checked against the metaschema before it is walked in turn."""
    in_place: dict[int, list[int]] = {}
    seen: set[int] = set()
    root = _LOCAL_ONLY.resolver_with_root(DRAFT202012.create_resource(schema))
    pending: list[tuple[Any, Any]] = [(schema, root)]
    while pending:
        targets: list[tuple[Any, Any]] = []
        while pending:
            node, resolver = pending.pop()
            if not isinstance(node, dict) or id(node) in seen:
                continue
            seen.add(id(node))
            resolver = resolver.in_subresource(DRAFT202012.create_resource(node))
            edges = in_place.setdefault(id(node), [])
            for ref_keyword in ("$ref", "$dynamicRef"):
                if ref_keyword in node:
                    resolved = _resolve(resolver, ref_keyword, node[ref_keyword], param)
                    edges.append(id(resolved.contents))
                    targets.append((resolved.contents, resolved.resolver))
            if isinstance(node.get("pattern"), str):
                _compiles(node["pattern"], param)
            for pattern in node.get("patternProperties", {}):
                _compiles(pattern, param)
            for sub, same in _subschemas(node):
                if isinstance(sub, dict):
                    if same:
                        edges.append(id(sub))
                    pending.append((sub, resolver))
        for contents, resolver in targets:
            if isinstance(contents, dict) and id(contents) not in seen:
                _valid_schema(contents, param)
                pending.append((contents, resolver))
            elif not isinstance(contents, dict | bool):
                _valid_schema(contents, param)
    if _has_cycle(in_place):
        _refuse_schema(
            "has references that loop back without reaching into the value"
            " (such as {'$ref': '#'}).",
            param,
        )


def _resolve(resolver: Any, keyword: str, ref: str, param: str) -> Any:
    if not ref.startswith("#"):
        _refuse_schema(
            f"has {keyword} {ref[:200]!r}: only local references ('#...') resolve.", param
        )
    try:
        return resolver.lookup(ref)
    except Unresolvable:
        _refuse_schema(f"has {keyword} {ref[:200]!r}, which points nowhere in it.", param)


def _subschemas(node: JSON) -> Iterator[tuple[Any, bool]]:
    """``node``'s subschemas, each with whether it applies to the same instance."""
    for keyword in _IN_PLACE_ONE:
        yield node.get(keyword), True
    for keyword in _IN_PLACE_MANY:
        for sub in node.get(keyword, ()):
            yield sub, True
    for keyword in _IN_PLACE_MAP:
        for sub in node.get(keyword, {}).values():
            yield sub, True
    for keyword in _INTO_ONE:
        yield node.get(keyword), False
    for keyword in _INTO_MANY:
        for sub in node.get(keyword, ()):
            yield sub, False
    for keyword in (*_INTO_MAP, *_HOLDERS):
        for sub in node.get(keyword, {}).values():
            yield sub, False


def _has_cycle(graph: dict[int, list[int]]) -> bool:
    """A cycle in a directed graph, by iterative depth-first search."""
    state: dict[int, int] = {}  # 1: on the current path, 2: done
    for start in graph:
        if state.get(start):
            continue
        path: list[tuple[int, Iterator[int]]] = [(start, iter(graph.get(start, ())))]
        state[start] = 1
        while path:
            node, children = path[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                path.pop()
            elif state.get(child) == 1:
                return True
            elif not state.get(child):
                state[child] = 1
                path.append((child, iter(graph.get(child, ()))))
    return False


def _compiles(pattern: str, param: str) -> None:
    try:
        regex.compile(pattern)
    except regex.error as exc:
        _refuse_schema(f"has a pattern that does not compile: {exc}.", param)


def check_request_schema(schema: JSON, param: str = PARAM) -> None:
    """Raise ``InvalidRequest`` (400, ``param``) unless ``schema`` is one the output check
    can hold answers to safely: bounded, a valid Draft 2020-12 schema, local references
    only, no reference loop in place, patterns that compile. Cheap: linear in its size."""
    if not isinstance(schema, dict):
        _refuse_schema("must be a JSON Schema object.", param)
    text = _measure(schema, param)
    if text in _ACCEPTED:
        _ACCEPTED.move_to_end(text)
        return
    _valid_schema(schema, param)
    _walk_references(schema, param)
    _ACCEPTED[text] = None
    if len(_ACCEPTED) > ACCEPTED_CACHED:
        _ACCEPTED.popitem(last=False)


def _valid_schema(schema: Any, param: str) -> None:
    try:
        Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        _refuse_schema(f"is not a valid JSON Schema: {exc.message[:MAX_MESSAGE_CHARS]}", param)


# ------------------------------------------------------------------------ the answer


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


def _first_error(schema: JSON, value: Any) -> ValidationError | None:
    errors = _Checker(schema, registry=_LOCAL_ONLY).iter_errors(value)
    return min(errors, key=lambda e: e.message, default=None)


def check_chat_output(answer: JSON, schema: JSON) -> None:
    """Raise ``InvalidModelOutput`` unless every choice's content is JSON matching ``schema``,
    as far as ``CHECK_BUDGET_S`` allows (past it, the answer counts as invalid). Raise
    ``InvalidRequest`` for a schema that ``check_request_schema`` refuses (it runs here
    too, remembered from the request's own check, so this check is safe on its own)."""
    check_request_schema(schema)
    token = _DEADLINE.set(time.monotonic() + CHECK_BUDGET_S)
    try:
        for choice in answer.get("choices") or ():
            _check_choice(choice, schema)
    finally:
        _DEADLINE.reset(token)


def _check_choice(choice: JSON, schema: JSON) -> None:
    content = (choice.get("message") or {}).get("content")
    index = choice.get("index", 0)
    try:
        value = json.loads(content or "")
    except (ValueError, RecursionError) as exc:
        raise InvalidModelOutput(
            f"choice {index}: the model's output is not JSON, as response_format requires."
        ) from exc
    _check_value(value, schema, f"choice {index}: the model's output", "the requested schema")


def check_value(value: Any, schema: JSON, what: str) -> None:
    """Raise ``InvalidModelOutput`` unless ``value`` (what the model produced, named by
    ``what``) matches ``schema``, within ``CHECK_BUDGET_S``; a tool's strict arguments."""
    check_request_schema(schema)
    token = _DEADLINE.set(time.monotonic() + CHECK_BUDGET_S)
    try:
        _check_value(value, schema, what, "its schema")
    finally:
        _DEADLINE.reset(token)


def _check_value(value: Any, schema: JSON, what: str, against: str) -> None:
    try:
        error = _first_error(schema, value)
    except _OutOfTime as exc:
        raise InvalidModelOutput(
            f"{what} could not be checked against {against} within {CHECK_BUDGET_S} s."
        ) from exc
    except RecursionError as exc:
        raise InvalidModelOutput(
            f"{what} is nested too deeply to check against {against}."
        ) from exc
    except Unresolvable as exc:
        raise InvalidRequest(
            "The schema has a reference that does not resolve locally"
            " (only '#/...' references do).",
            param=PARAM,
        ) from exc
    except _BadPattern as exc:
        raise InvalidRequest(
            "The schema has a pattern that does not compile.", param=PARAM
        ) from exc
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        raise InvalidModelOutput(
            f"{what} breaks {against} at {where}: {error.message[:MAX_MESSAGE_CHARS]}"
        )
