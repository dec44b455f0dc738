"""Every error in the taxonomy renders as OpenAI's error shape with the right status."""

from __future__ import annotations

import pytest

from models.errors import (
    EngineFailed,
    EngineOverloaded,
    EngineRejected,
    EngineTimeout,
    EngineUnavailable,
    ModelNotFound,
    ModelNotInStore,
)
from serving.errors import (
    ClientClosed,
    InvalidRequest,
    MethodNotAllowed,
    PayloadTooLarge,
    PermissionDenied,
    RouteNotFound,
    Unauthenticated,
    WrongTask,
    render,
)
from tests.openai_spec import validate

CASES: list[tuple[Exception, int, str, str]] = [
    (InvalidRequest("bad", param="n"), 400, "invalid_request_error", "invalid_request"),
    (WrongTask("chat model"), 400, "invalid_request_error", "model_not_supported"),
    (
        EngineRejected("too long", status=400, param="max_tokens"),
        400,
        "invalid_request_error",
        "invalid_request",
    ),
    (Unauthenticated("no key"), 401, "authentication_error", "invalid_api_key"),
    (PermissionDenied("no"), 403, "permission_error", "permission_denied"),
    (ModelNotFound("x"), 404, "invalid_request_error", "model_not_found"),
    (RouteNotFound("x"), 404, "invalid_request_error", "not_found"),
    (MethodNotAllowed("x"), 405, "invalid_request_error", "method_not_allowed"),
    (PayloadTooLarge("big"), 413, "invalid_request_error", "payload_too_large"),
    (ClientClosed("gone"), 499, "invalid_request_error", "client_closed_request"),
    (EngineFailed("boom"), 502, "server_error", "engine_error"),
    (EngineUnavailable("down"), 503, "server_error", "engine_unavailable"),
    (EngineOverloaded("full"), 503, "server_error", "engine_overloaded"),
    (ModelNotInStore("m", "/s"), 503, "server_error", "model_unavailable"),
    (EngineTimeout("slow"), 504, "server_error", "engine_timeout"),
    (RuntimeError("secret detail"), 500, "server_error", "internal_error"),
]


@pytest.mark.parametrize(("exc", "status", "kind", "code"), CASES, ids=lambda v: type(v).__name__)
def test_each_error_renders(exc: Exception, status: int, kind: str, code: str) -> None:
    got_status, body, headers = render(exc, "req-1")
    assert got_status == status
    assert body["error"]["type"] == kind
    assert body["error"]["code"] == code
    validate("ErrorResponse", body)
    if status == 503:
        assert int(headers["retry-after"]) > 0


def test_param_is_carried() -> None:
    _, body, _ = render(InvalidRequest("bad n", param="n"), "r")
    assert body["error"]["param"] == "n"
    _, body, _ = render(ModelNotFound("gpt"), "r")
    assert body["error"]["param"] == "model"


def test_internal_error_hides_details_and_names_the_request() -> None:
    _, body, _ = render(RuntimeError("secret detail"), "req-42")
    assert "secret" not in body["error"]["message"]
    assert "req-42" in body["error"]["message"]


def test_subclass_inherits_its_parents_row() -> None:
    class Slower(EngineTimeout):
        pass

    assert render(Slower("x"), "r")[0] == 504
