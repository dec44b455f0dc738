"""The structured-output check holds hostile schemas to bounds: local references only,
bounded size and depth, patterns under a time budget, no RecursionError."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from serving.core import output_check
from serving.core.output_check import check_chat_output, check_request_schema
from serving.errors import InvalidModelOutput, InvalidRequest

JSON = dict[str, Any]


def answer(content: str) -> JSON:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}


def nested(levels: int) -> JSON:
    schema: JSON = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def test_a_normal_schema_is_checked() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    check_request_schema(schema)
    check_chat_output(answer('{"city": "Paris"}'), schema)
    with pytest.raises(InvalidModelOutput, match="city"):
        check_chat_output(answer('{"town": "Paris"}'), schema)
    with pytest.raises(InvalidModelOutput, match="not JSON"):
        check_chat_output(answer("Paris!"), schema)


def test_local_references_resolve() -> None:
    schema = {
        "$defs": {"city": {"type": "string", "pattern": "^[A-Z]"}, "n": {"$anchor": "n"}},
        "type": "object",
        "properties": {"city": {"$ref": "#/$defs/city"}, "next": {"$ref": "#"}},
    }
    check_request_schema(schema)
    check_chat_output(answer('{"city": "Paris", "next": {"city": "Lyon"}}'), schema)
    with pytest.raises(InvalidModelOutput, match="next/city"):
        check_chat_output(answer('{"city": "Paris", "next": {"city": "lyon"}}'), schema)


@pytest.mark.parametrize(
    "ref", ["http://127.0.0.1:9/internal", "file:///etc/passwd", "other.json", "#/$defs/none"]
)
def test_a_reference_that_is_not_local_is_refused(ref: str) -> None:
    schema = {"type": "object", "properties": {"a": {"$ref": ref}}}
    with pytest.raises(InvalidRequest) as refused:
        check_request_schema(schema)
    assert refused.value.param == "response_format.json_schema.schema"
    # the answer's check refuses it the same way, and fetches nothing
    with pytest.raises(InvalidRequest):
        check_chat_output(answer('{"a": 1}'), schema)


def test_a_file_is_never_read(tmp_path: Path) -> None:
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"type": "string", "description": "TOP-SECRET-42"}))
    schema = {"$ref": secret.as_uri()}
    with pytest.raises(InvalidRequest) as refused:
        check_chat_output(answer("1"), schema)
    assert "TOP-SECRET" not in str(refused.value)


def test_an_embedded_id_does_not_fetch() -> None:
    # a "#" reference under a remote $id resolves to the embedded resource, not the URL
    schema = {"$id": "http://127.0.0.1:9/base", "$defs": {"a": {"type": "integer"}}}
    schema |= {"$ref": "#/$defs/a"}
    check_request_schema(schema)
    check_chat_output(answer("3"), schema)


def test_depth_and_size_are_bounded() -> None:
    check_request_schema(nested(output_check.MAX_SCHEMA_DEPTH // 2 - 1))
    with pytest.raises(InvalidRequest, match="deeper"):
        check_request_schema(nested(110))
    with pytest.raises(InvalidRequest, match="deeper"):
        check_request_schema(nested(5000))  # no RecursionError on the way
    big = {"enum": ["x" * 1000] * (output_check.MAX_SCHEMA_BYTES // 1000 + 1)}
    with pytest.raises(InvalidRequest, match="bytes"):
        check_request_schema(big)


@pytest.mark.parametrize(
    "schema",
    [
        {"$ref": "#"},
        {"anyOf": [{"$ref": "#"}]},
        {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"allOf": [{"$ref": "#/$defs/a"}]}}}
        | {"$ref": "#/$defs/a"},
        {"$id": "http://x/", "not": {"$ref": "#"}},
        {"unevaluatedProperties": False, "$ref": "#"},
    ],
)
def test_a_reference_loop_is_refused_not_a_crash(schema: JSON) -> None:
    with pytest.raises(InvalidRequest, match="loop"):
        check_request_schema(schema)
    with pytest.raises(InvalidRequest):
        check_chat_output(answer('{"a": 1}'), schema)


@pytest.mark.parametrize(
    "schema",
    [
        {"type": 5},
        {"pattern": "(?<"},
        {"$ref": "#/x", "x": {"allOf": 5}},  # not a schema under an unknown keyword
        {"$ref": "#/x", "x": 5},
    ],
)
def test_what_is_not_a_schema_is_refused(schema: JSON) -> None:
    with pytest.raises(InvalidRequest):
        check_request_schema(schema)
    with pytest.raises(InvalidRequest):
        check_chat_output(answer("1"), schema)  # the output check refuses it on its own


@pytest.mark.parametrize(
    ("schema", "content"),
    [
        ({"type": "string", "pattern": "^(a|a)+$"}, json.dumps("a" * 40 + "!")),
        ({"type": "string", "pattern": "^(a+)+$"}, json.dumps("a" * 40 + "!")),
        (
            {"type": "object", "patternProperties": {"^(a|aa)+$": {}}},
            json.dumps({"a" * 60 + "!": 1}),
        ),
        (
            {"patternProperties": {"^(a|a)+$": {}}, "additionalProperties": False},
            json.dumps({"a" * 40 + "!": 1}),
        ),
        (
            {"patternProperties": {"^(a|a)+$": {}}, "unevaluatedProperties": False},
            json.dumps({"a" * 40 + "!": 1}),
        ),
    ],
)
def test_a_catastrophic_pattern_answers_in_bounded_time(schema: JSON, content: str) -> None:
    check_request_schema(schema)
    started = time.monotonic()
    # invalid either way: the budget stopped the backtracking, or (regex optimises some of
    # these patterns) the match finished and failed
    with pytest.raises(InvalidModelOutput, match=r"within 0\.25 s|does not match"):
        check_chat_output(answer(content), schema)
    # this bound is only against a hang (the backtracking runs for hours without the
    # budget): wide, so that a loaded host does not fail it (was < 1 s, and did)
    assert time.monotonic() - started < 10.0


def test_fanning_references_stop_at_the_budget() -> None:
    # each level tries both branches of the next: 2**30 evaluations without a budget
    defs = {f"d{i}": {"anyOf": [{"$ref": f"#/$defs/d{i + 1}"}] * 2} for i in range(30)}
    schema = {"$defs": defs | {"d30": {"type": "string"}}, "$ref": "#/$defs/d0"}
    check_request_schema(schema)
    started = time.monotonic()
    with pytest.raises(InvalidModelOutput, match="within"):  # stopped by the budget
        check_chat_output(answer("1"), schema)
    assert time.monotonic() - started < 10.0  # only against a hang: 2**30 take hours


def test_deep_output_is_invalid_not_a_crash() -> None:
    schema = {"type": "array", "items": {"$ref": "#"}}
    check_request_schema(schema)
    check_chat_output(answer("[[[]]]"), schema)
    for depth in (900, 100_000):
        with pytest.raises(InvalidModelOutput):
            check_chat_output(answer("[" * depth + "]" * depth), schema)
