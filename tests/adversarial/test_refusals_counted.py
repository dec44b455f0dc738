"""Every answer of a model route is counted once in ``weir_requests_total`` and errors in
``model_errors_total``, whatever stops it: a body that is not JSON, a wrong field, a body
too large, a missing key or a wrong method, as well as what the use case refuses."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import SecretStr
from starlette.testclient import TestClient

from tests.fakes.engine import FakeEngine
from tests.unit.test_gateway import CHAT, make_client

KEY = {"authorization": "Bearer sk-counted"}
ROUTE = "/v1/chat/completions"


@pytest.fixture
def client() -> Iterator[TestClient]:
    with make_client(FakeEngine(), api_keys=[SecretStr("sk-counted")], max_body_bytes=2048) as c:
        yield c


def counted(metrics: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    total = 0.0
    for line in metrics.splitlines():
        match = re.match(rf"{name}\{{(.*)\}} ([0-9.e+]+)$", line)
        if match is None:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


def test_refusals_before_the_model_is_known_are_counted_once(client: TestClient) -> None:
    sent: list[tuple[int, str]] = []

    def post(**kwargs: Any) -> None:
        answer = client.post(ROUTE, **kwargs)
        sent.append((answer.status_code, answer.json()["error"]["code"]))

    json_headers = KEY | {"content-type": "application/json"}
    post(content=b"{not json", headers=json_headers)  # 400 before any model is named
    post(json=CHAT | {"temperature": 9}, headers=KEY)  # 400: a field out of range
    post(json=CHAT | {"messages": [{"role": "user", "content": "x" * 5000}]}, headers=KEY)  # 413
    post(json=CHAT)  # 401: no key
    answer = client.get(ROUTE, headers=KEY)  # 405
    sent.append((answer.status_code, answer.json()["error"]["code"]))
    post(json=CHAT | {"model": "nope"}, headers=KEY)  # 404: refused by the use case
    assert [s for s, _ in sent] == [400, 400, 413, 401, 405, 404]
    metrics = client.get("/metrics").text
    for status in (400, 413, 401, 405, 404):
        expected = sum(1 for s, _ in sent if s == status)
        assert counted(metrics, "weir_requests_total", route=ROUTE, status=str(status)) == expected
    for code in ("invalid_request", "payload_too_large", "invalid_api_key", "method_not_allowed",
                 "model_not_found"):  # fmt: skip
        expected = sum(1 for _, c in sent if c == code)
        assert counted(metrics, "model_errors_total", error_type=code) == expected, code
    ok = client.post(ROUTE, json=CHAT, headers=KEY)
    assert ok.status_code == 200
    metrics = client.get("/metrics").text
    assert counted(metrics, "weir_requests_total", route=ROUTE) == len(sent) + 1
