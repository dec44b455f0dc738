"""Hostile ``response_format`` schemas against the real gateway app in-process: no
network or disk is reached, no 500, and every answer comes in bounded time while the
gateway keeps answering others."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from tests.fakes.engine import FakeEngine
from tests.unit.test_gateway import CHAT, make_client

JSON = dict[str, Any]


def schema_format(schema: JSON) -> JSON:
    return {"type": "json_schema", "json_schema": {"name": "hostile", "schema": schema}}


def ask(client: TestClient, schema: JSON) -> Any:
    body = CHAT | {"response_format": schema_format(schema)}
    return client.post("/v1/chat/completions", json=body)


def nested(levels: int) -> JSON:
    schema: JSON = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


class Listener:
    """A local TCP server that records every connection and closes it unanswered (one
    that never answered made the old check hang the event loop for ~20 s)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.stopping.set()
        self.thread.join()
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    server = Listener()
    try:
        yield server
    finally:
        server.close()


def test_a_remote_ref_reaches_nothing(listener: Listener) -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"$ref": f"http://127.0.0.1:{listener.port}/s"}},
    }
    with make_client(FakeEngine(content='{"a": 1}')) as client:
        started = time.monotonic()
        response = ask(client, schema)
        took = time.monotonic() - started
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"].startswith("response_format")
    assert took < 1.0
    assert listener.connections == 0


def test_a_file_ref_reads_nothing(tmp_path: Path) -> None:
    secret = tmp_path / "internal.json"
    secret.write_text(json.dumps({"type": "string", "description": "TOP-SECRET-1234"}))
    with make_client(FakeEngine(content='"x"')) as client:
        response = ask(client, {"$ref": secret.as_uri()})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].startswith("response_format")
    assert "TOP-SECRET" not in response.text


def test_a_schema_nested_110_levels_is_a_400() -> None:
    # refused by the body's own bounds or by the schema's (the old check: a 500)
    with make_client(FakeEngine(content='{"a": 1}')) as client:
        response = ask(client, nested(110))
    assert response.status_code == 400, response.text


@pytest.mark.parametrize(
    "schema",
    [nested(20), {"$ref": "#"}, {"anyOf": [{"$ref": "#"}]}, {"$ref": "#/$defs/missing"}],
    ids=["nested-41-levels", "self-ref", "anyOf-self-ref", "missing-ref"],
)
def test_a_hostile_schema_is_a_400_not_a_500(schema: JSON) -> None:
    with make_client(FakeEngine(content='{"a": 1}')) as client:
        response = ask(client, schema)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].startswith("response_format")


def test_a_catastrophic_pattern_answers_in_bounded_time_and_healthz_meanwhile() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string", "pattern": "^(a+)+$"}}}
    content = json.dumps({"a": "a" * 28 + "!"})
    with make_client(FakeEngine(content=content)) as client, ThreadPoolExecutor(2) as pool:
        started = time.monotonic()
        slow = pool.submit(ask, client, schema)
        health_took: list[float] = []
        while not slow.done():
            asked = time.monotonic()
            assert client.get("/healthz").status_code == 200
            health_took.append(time.monotonic() - asked)
            if time.monotonic() - started > 30:
                break
        response = slow.result()
        took = time.monotonic() - started
    assert response.status_code == 502, response.text  # the output is invalid (or uncheckable)
    assert response.json()["error"]["code"] == "invalid_model_output"
    assert took < 1.0
    assert max(health_took) < 1.0


@pytest.mark.parametrize(
    ("content", "status", "valid"),
    [('{"city": "Paris"}', 200, "true"), ('{"city": "paris"}', 502, None)],
)
def test_a_normal_schema_is_still_checked(content: str, status: int, valid: str | None) -> None:
    schema = {
        "$defs": {"city": {"type": "string", "pattern": "^[A-Z][a-z]+$"}},
        "type": "object",
        "properties": {"city": {"$ref": "#/$defs/city"}},
        "required": ["city"],
    }
    with make_client(FakeEngine(content=content)) as client:
        response = ask(client, schema)
    assert response.status_code == status, response.text
    assert response.headers.get("x-weir-output-valid") == valid
    if status == 502:
        assert response.json()["error"]["code"] == "invalid_model_output"


def test_a_tool_schema_that_reaches_out_is_refused_before_the_engine() -> None:
    """Tool ``parameters`` are schemas too: the same bounds as ``response_format``'s."""
    engine = FakeEngine()
    tool = {
        "type": "function",
        "function": {"name": "f", "parameters": {"$ref": "file:///etc/passwd"}},
    }
    with make_client(engine) as client:
        answer = client.post("/v1/chat/completions", json=CHAT | {"tools": [tool]})
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "tools[0].function.parameters"
    assert "root:" not in answer.text
    assert engine.calls == []
