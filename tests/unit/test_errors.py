"""Every error in the taxonomy renders as OpenAI's error shape with the right status."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

from models.errors import (
    ConfigError,
    EngineFailed,
    EngineOverloaded,
    EngineRejected,
    EngineTimeout,
    EngineUnavailable,
    ModelNotFound,
    ModelNotInStore,
)
from retrieval.errors import (
    CollectionExists,
    CollectionNotFound,
    DocumentNotFound,
    InvalidName,
    RetrievalError,
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
    spec_for,
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
    (MethodNotAllowed("x", allow=["POST"]), 405, "invalid_request_error", "method_not_allowed"),
    (PayloadTooLarge("big"), 413, "invalid_request_error", "payload_too_large"),
    (InvalidName("bad name"), 400, "invalid_request_error", "invalid_request"),
    (CollectionNotFound("no c"), 404, "invalid_request_error", "collection_not_found"),
    (DocumentNotFound("no d"), 404, "invalid_request_error", "document_not_found"),
    (CollectionExists("c"), 409, "invalid_request_error", "collection_exists"),
    (RetrievalError("3 vectors for 4"), 502, "server_error", "retrieval_error"),
    (ConfigError("no version v9"), 500, "server_error", "server_misconfigured"),
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


def test_a_config_error_says_what_is_misconfigured() -> None:
    _, body, _ = render(ConfigError("model 'm' has no version 'v9'"), "r")
    assert body["error"]["message"] == "model 'm' has no version 'v9'"


PACKAGES = ("serving", "models", "retrieval")

# Exceptions with no row in ERROR_TABLE, each because it never reaches a client; a
# new one needs a row, or a line here that says where it is caught.
NEVER_RENDERED = {
    # abstract bases, never raised themselves; every subclass has a row (or inherits one)
    "serving.errors.GatewayError",
    "models.errors.WeirModelError",
    # caught in serving.cache.service: a cache that is down is skipped, the request served
    "serving.cache.store.CacheUnavailable",
    # Limiter.admit turns it into LimitsUnavailable (fail closed) or uses the in-process
    # store (fail open), Limiter._settle logs it, the admin limits routes translate it
    "serving.limits.store.LimitStoreUnavailable",
    # DELETE /admin/keys/{id} turns it into RouteNotFound; `weir keys revoke` prints it
    "serving.keys.store.UnknownKey",
    # raised and caught inside the background deploy task, recorded on its Operation
    "serving.rollout.operation.DeployFailed",
    # Deployer._gate turns it into DeployRefused
    "serving.rollout.gate.GateSyntaxError",
    # the weir command's own (it calls the admin API and prints the failure)
    "serving.cli.admin_client.AdminCallFailed",
    # the engine connection's own; models.engines.client turns each into an EngineError
    "models.engines.h1.UpstreamError",
    "models.engines.h1.ConnectFailed",
    "models.engines.h1.UpstreamTimeout",
    "models.engines.h1.ConnectionBroken",
    # the SSE parser's own; models.engines.client turns it into EngineFailed
    "models.engines.sse.EventTooLarge",
    # an index worker's: it answers 409 for a shard it does not hold (worker_http), and the
    # gateway's scatter takes that (_Refused) as a reason to try the shard's next owner
    "retrieval.worker.NotHeld",
    "retrieval.scatter._Refused",
    # output_check's own: a pattern out of time or that does not compile, caught there and
    # reported as InvalidModelOutput (an answer) or InvalidRequest (a schema)
    "serving.core.output_check._OutOfTime",
    "serving.core.output_check._BadPattern",
}


def project_exceptions() -> dict[str, type[Exception]]:
    """Every exception class defined in a module of the project's packages, by full name."""
    found: dict[str, type[Exception]] = {}
    for name in PACKAGES:
        package = importlib.import_module(name)
        for module_info in pkgutil.walk_packages(package.__path__, f"{name}."):
            module = importlib.import_module(module_info.name)
            for value in vars(module).values():
                if (
                    isinstance(value, type)
                    and issubclass(value, Exception)
                    and value.__module__ == module.__name__
                ):
                    found[f"{value.__module__}.{value.__qualname__}"] = value
    return found


def test_every_exception_has_a_row_or_never_reaches_a_client() -> None:
    found = project_exceptions()
    # only the class matters to the MRO lookup; __init__ signatures differ
    missing = sorted(
        name
        for name, cls in found.items()
        if spec_for(cls.__new__(cls)) is None and name not in NEVER_RENDERED
    )
    assert not missing, f"no row in serving.errors.ERROR_TABLE: {missing}"
    assert set(found) >= NEVER_RENDERED, f"gone: {sorted(NEVER_RENDERED - set(found))}"
    listed_with_row = sorted(
        name for name in NEVER_RENDERED if spec_for(found[name].__new__(found[name])) is not None
    )
    assert not listed_with_row, f"has a row now, drop it from NEVER_RENDERED: {listed_with_row}"
