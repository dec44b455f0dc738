"""A batch's input file read as requests, and its output lines as OpenAI writes them.

Each input line is ``{"custom_id", "method": "POST", "url", "body"}``; the body is held to
the endpoint's own request model (the same as the route's), streaming is refused, and
custom ids are unique. Problems are reported as OpenAI reports them: ``BatchError`` items
with the 1-based line number, at most ``MAX_ERRORS`` of them.

A file is read one line at a time (lines end with ``\n``; a ``\r`` before it is blank
space), never split into a list at once: a 50 MB file of tiny lines would be a list of
millions of objects, a gigabyte, made while the GIL is held. A file with more than
``max_requests + MAX_BLANK_LINES`` lines in all is refused before any is read, and a line
is a request: at most ``max_line_bytes``, the gateway's own body limit
(``gateway.max_body_bytes``, which ``make_batches`` passes), and nested no deeper than JSON
can be written back (``MAX_LINE_DEPTH``).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import ValidationError

from serving.batches.store import Line
from serving.core.proxy import CHAT, COMPLETIONS, EMBEDDINGS, Route
from serving.protocol.requests import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ModelRequest,
)

JSON = dict[str, Any]
MAX_ERRORS = 100
MAX_CUSTOM_ID = 512
NUL = "\x00"  # PostgreSQL's text takes none (lines.custom_id): a line with one is refused
MAX_BLANK_LINES = 10_000  # empty lines a file may have besides its requests
MAX_LINE_DEPTH = 254  # nesting orjson writes back (it reads 1024): deeper is refused


@dataclass(frozen=True)
class Endpoint:
    route: Route
    model: type[ModelRequest]


ENDPOINTS = {
    CHAT.path: Endpoint(CHAT, ChatCompletionRequest),
    COMPLETIONS.path: Endpoint(COMPLETIONS, CompletionRequest),
    EMBEDDINGS.path: Endpoint(EMBEDDINGS, EmbeddingRequest),
}


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def error(code: str, message: str, line: int | None = None, param: str | None = None) -> JSON:
    return {"code": code, "message": message, "param": param, "line": line}


def numbered(content: bytes) -> Iterator[tuple[int, bytes]]:
    """Each line that is not blank, with its 1-based number, made one at a time."""
    start, number, end = 0, 0, len(content)
    while start < end:
        stop = content.find(b"\n", start)
        if stop < 0:
            stop = end
        number += 1
        line = content[start:stop]
        if line and not line.isspace():
            yield number, line
        start = stop + 1


def too_many_lines(content: bytes, max_lines: int) -> bool:
    """More lines in all than ``max_lines`` requests and ``MAX_BLANK_LINES`` blank ones
    (counted in C, before any line is made)."""
    return content.count(b"\n") > max_lines + MAX_BLANK_LINES


def too_long(raw: bytes, max_line_bytes: int) -> str | None:
    if len(raw) > max_line_bytes:
        return f"is {len(raw)} bytes; a request is at most {max_line_bytes}"
    return None


def check_jsonl(content: bytes, max_lines: int, max_line_bytes: int) -> str | None:
    """What is wrong with an upload for ``purpose=batch`` at a glance (None: nothing):
    UTF-8, one JSON object a line, at most ``max_lines`` lines, each a request's size."""
    if too_many_lines(content, max_lines):
        return f"The file has more than {max_lines} requests (batches.max_requests)."
    count = 0
    for number, raw in numbered(content):  # blank lines are ASCII: UTF-8 as they are
        count += 1
        if count > max_lines:
            return f"The file has more than {max_lines} requests (batches.max_requests)."
        long = too_long(raw, max_line_bytes)
        if long is not None:
            return f"Line {number} {long}."
        try:
            raw.decode()
        except UnicodeDecodeError:
            return "The file is not UTF-8 text."
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return f"Line {number} is not JSON."
        if not isinstance(parsed, dict):
            return f"Line {number} is not a JSON object."
    if count == 0:
        return "The file has no requests."
    return None


def parse(
    content: bytes, endpoint: str, max_lines: int, max_line_bytes: int
) -> tuple[list[Line], list[JSON]]:
    """The requests of a batch's input file, or the errors that fail the batch."""
    target = ENDPOINTS[endpoint]
    lines: list[Line] = []
    errors: list[JSON] = []
    seen: set[str] = set()
    if too_many_lines(content, max_lines):
        return [], [error("too_many_requests", f"More than {max_lines} requests.")]
    for number, raw in numbered(content):
        if len(errors) >= MAX_ERRORS:
            break
        if len(lines) >= max_lines:
            errors.append(error("too_many_requests", f"More than {max_lines} requests.", number))
            break
        problem, line = _line(raw, number, target, endpoint, seen, len(lines), max_line_bytes)
        if problem is not None:
            errors.append(problem)
        elif line is not None:
            lines.append(line)
    if not lines and not errors:
        errors.append(error("empty_file", "The input file has no requests."))
    return lines, errors


def _line(
    raw: bytes,
    number: int,
    target: Endpoint,
    endpoint: str,
    seen: set[str],
    index: int,
    max_line_bytes: int,
) -> tuple[JSON | None, Line | None]:
    long = too_long(raw, max_line_bytes)
    if long is not None:
        return error("line_too_large", f"This line {long}.", number), None
    try:
        item = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return error("invalid_json_line", "This line is not valid JSON.", number), None
    if not isinstance(item, dict):
        return error("invalid_request", "Each line must be a JSON object.", number), None
    custom_id = item.get("custom_id")
    if (
        not isinstance(custom_id, str)
        or not 0 < len(custom_id) <= MAX_CUSTOM_ID
        or NUL in custom_id
    ):
        message = f"custom_id must be a string of 1 to {MAX_CUSTOM_ID} characters, without NUL."
        return error("invalid_request", message, number, "custom_id"), None
    if custom_id in seen:
        return error("duplicate_custom_id", f"custom_id '{custom_id}' is used twice.", number,
                     "custom_id"), None  # fmt: skip
    if item.get("method") != "POST":
        return error("invalid_method", "method must be POST.", number, "method"), None
    if item.get("url") != endpoint:
        message = f"url must be the batch's endpoint, {endpoint}."
        return error("mismatched_url", message, number, "url"), None
    body = item.get("body")
    if not isinstance(body, dict):
        return error("invalid_request", "body must be a JSON object.", number, "body"), None
    if body.get("stream"):
        return error("invalid_request", "A batch request cannot stream.", number,
                     "body.stream"), None  # fmt: skip
    try:
        encoded = orjson.dumps(body)
    except orjson.JSONEncodeError:  # nested deeper than orjson writes
        message = f"body is nested more than {MAX_LINE_DEPTH} levels deep."
        return error("invalid_request", message, number, "body"), None
    try:
        target.model.model_validate_json(encoded)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error("invalid_request", f"body.{where}: {first.get('msg')}", number,
                     f"body.{where}" if where else "body"), None  # fmt: skip
    seen.add(custom_id)
    return None, Line(index, custom_id, encoded)


def output_line(custom_id: str, request_id: str, status: int, body: JSON) -> bytes:
    """One line of an output (or error) file for an answered request."""
    response = {"status_code": status, "request_id": request_id, "body": body}
    return orjson.dumps(
        {"id": new_id("batch_req_"), "custom_id": custom_id, "response": response, "error": None}
    )


def unanswered_line(custom_id: str, code: str, message: str) -> bytes:
    """One line of an error file for a request that never ran (cancelled, expired)."""
    return orjson.dumps(
        {"id": new_id("batch_req_"), "custom_id": custom_id, "response": None,
         "error": {"code": code, "message": message}}
    )  # fmt: skip
