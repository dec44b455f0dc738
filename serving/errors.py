"""Gateway errors and the one table that turns any error into an OpenAI error response.

The gateway's own tree::

    GatewayError
    ├── InvalidRequest      400  the body is malformed or breaks a limit (``param`` names the field)
    ├── WrongTask           400  e.g. embeddings asked of a chat model
    ├── Unauthenticated     401
    ├── PermissionDenied    403
    ├── RouteNotFound       404
    ├── MethodNotAllowed    405  ``Allow`` names the methods the route accepts
    ├── PayloadTooLarge     413
    ├── ContextLengthExceeded 400  prompt + max_tokens over the model's context (both numbers said)
    ├── RateLimited         429  a limit said no; ``Retry-After`` and ``x-ratelimit-*`` headers
    ├── BudgetExceeded      429  a money budget said no: which, what is left, what was needed
    ├── InvalidModelOutput  502  the answer broke the requested JSON schema
    ├── AuthUnavailable     503  the key store cannot be reached
    ├── LimitsUnavailable   503  the rate-limit store cannot be reached (policy: fail closed)
    ├── RetrievalUnavailable 503 retrieval was required and could not be done
    ├── DeployRefused       422  a deploy, rollback or split that cannot be done as asked
    ├── DeployInProgress    409  another rollout of the same model is running
    ├── ResponseNotFound    404  no stored response with that id for this key
    ├── ResponsesUnavailable 503 the response store cannot be reached
    ├── FileNotFound        404  no file with that id for this key (Batch API)
    ├── BatchNotFound       404  no batch with that id for this key
    ├── BatchesUnavailable  503  the batch store cannot be read or written
    ├── StorageQuotaExceeded 400 the tenant's stored files are at batches.max_tenant_bytes/_files
    └── ClientClosed        499  the client went away (logged only; nobody reads the answer)

``models.errors`` brings the model and engine errors, ``retrieval.errors`` the
collection and document errors. ``ERROR_TABLE`` maps each class to
status, OpenAI ``type`` and ``code``, looked up along the MRO (as Starlette finds its
handlers), so a subclass inherits its parent's row unless it has its own. Anything not
in the table is a 500 ``internal_error`` that names the request id.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from models.errors import (
    ConfigError,
    EngineError,
    EngineFailed,
    EngineOverloaded,
    EngineRejected,
    EngineTimeout,
    EngineUnavailable,
    ModelNotFound,
    StoreError,
)
from retrieval.errors import (
    CollectionExists,
    CollectionNotFound,
    DocumentNotFound,
    InvalidName,
    RetrievalError,
    ShardUnavailable,
    StoreUnavailable,
    WorkerUnauthenticated,
)
from serving.core.answer import VERSION_HEADER


class GatewayError(Exception):
    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(GatewayError):
    pass


class WrongTask(GatewayError):
    pass


class Unauthenticated(GatewayError):
    pass


class PermissionDenied(GatewayError):
    pass


class RouteNotFound(GatewayError):
    pass


class MethodNotAllowed(GatewayError):
    """``allow``: the methods the route accepts, sent as the ``Allow`` header HTTP requires."""

    def __init__(self, message: str, *, allow: Iterable[str]) -> None:
        super().__init__(message)
        self.headers = {"allow": ", ".join(allow)}


class PayloadTooLarge(GatewayError):
    pass


class ClientClosed(GatewayError):
    pass


class HeaderTooLarge(GatewayError):
    """A request's head (request line and headers) is over ``gateway.max_header_bytes``."""


class RequestTimeout(GatewayError):
    """A client did not send its headers, or its body, within the gateway's time."""


class TooManyConnections(GatewayError):
    """One client address holds ``gateway.max_connections_per_client`` connections."""


class ContextLengthExceeded(GatewayError):
    pass


class InvalidModelOutput(GatewayError):
    pass


class AuthUnavailable(GatewayError):
    pass


class RateLimited(GatewayError):
    def __init__(
        self,
        message: str,
        *,
        retry_after_s: int,
        headers: dict[str, str] | None = None,
        param: str | None = None,
        limit: str = "unknown",
    ) -> None:
        super().__init__(message, param=param)
        self.retry_after_s = retry_after_s
        self.headers = headers or {}
        self.limit = limit  # which one said no: rpm, tpm, tokens_per_day, ...


class BudgetExceeded(GatewayError):
    """A money budget (the key's or its team's) cannot hold this request's worst-case cost;
    amounts in nano-dollars, ``budget`` is ``key:day``, ``team:month``, ``key:total``..."""

    def __init__(
        self,
        message: str,
        *,
        budget: str,
        limit: int,
        remaining: int,
        needed: int,
        retry_after_s: int | None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.budget, self.limit, self.remaining, self.needed = budget, limit, remaining, needed
        self.retry_after_s = retry_after_s  # None: a total budget never resets
        self.headers = headers or {}


class RetrievalUnavailable(GatewayError):
    """Retrieval was required for this request and could not be done."""


class LimitsUnavailable(GatewayError):
    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeployRefused(GatewayError):
    """A deploy, rollback or split that cannot be done as asked (nothing was changed)."""


class DeployInProgress(GatewayError):
    """Another rollout of the same model is running."""


class ResponseNotFound(GatewayError):
    """No stored response with that id for this key (expired, deleted or never stored)."""


class ResponsesUnavailable(GatewayError):
    """The response store cannot be reached."""


class FileNotFound(GatewayError):
    """No file with that id for this key (the Batch API's files)."""


class BatchNotFound(GatewayError):
    """No batch with that id for this key."""


class BatchesUnavailable(GatewayError):
    """The batch store cannot be read or written."""


class StorageQuotaExceeded(GatewayError):
    """Storing this would take the tenant's files past ``batches.max_tenant_bytes`` or
    ``batches.max_tenant_files``; nothing was stored. A 400, as OpenAI answers an upload
    past a project's file storage quota (``invalid_request_error``): waiting does not
    help, deleting files does (a 429 would have clients retry it)."""


@dataclass(frozen=True)
class ErrorSpec:
    status: int
    type: str
    code: str
    retry_after_s: int | None = None


ERROR_TABLE: dict[type[BaseException], ErrorSpec] = {
    InvalidRequest: ErrorSpec(400, "invalid_request_error", "invalid_request"),
    WrongTask: ErrorSpec(400, "invalid_request_error", "model_not_supported"),
    ContextLengthExceeded: ErrorSpec(400, "invalid_request_error", "context_length_exceeded"),
    EngineRejected: ErrorSpec(400, "invalid_request_error", "invalid_request"),
    Unauthenticated: ErrorSpec(401, "authentication_error", "invalid_api_key"),
    PermissionDenied: ErrorSpec(403, "permission_error", "permission_denied"),
    ModelNotFound: ErrorSpec(404, "invalid_request_error", "model_not_found"),
    RouteNotFound: ErrorSpec(404, "invalid_request_error", "not_found"),
    MethodNotAllowed: ErrorSpec(405, "invalid_request_error", "method_not_allowed"),
    PayloadTooLarge: ErrorSpec(413, "invalid_request_error", "payload_too_large"),
    HeaderTooLarge: ErrorSpec(431, "invalid_request_error", "request_header_too_large"),
    RequestTimeout: ErrorSpec(408, "invalid_request_error", "request_timeout"),
    TooManyConnections: ErrorSpec(429, "rate_limit_error", "too_many_connections", retry_after_s=1),
    RateLimited: ErrorSpec(429, "rate_limit_error", "rate_limit_exceeded", retry_after_s=1),
    BudgetExceeded: ErrorSpec(429, "insufficient_quota", "budget_exceeded"),
    ClientClosed: ErrorSpec(499, "invalid_request_error", "client_closed_request"),
    InvalidModelOutput: ErrorSpec(502, "server_error", "invalid_model_output"),
    EngineFailed: ErrorSpec(502, "server_error", "engine_error"),
    EngineError: ErrorSpec(502, "server_error", "engine_error"),  # a subclass with no row yet
    EngineUnavailable: ErrorSpec(503, "server_error", "engine_unavailable", retry_after_s=5),
    EngineOverloaded: ErrorSpec(503, "server_error", "engine_overloaded", retry_after_s=1),
    StoreError: ErrorSpec(503, "server_error", "model_unavailable", retry_after_s=30),
    AuthUnavailable: ErrorSpec(503, "server_error", "auth_unavailable", retry_after_s=1),
    LimitsUnavailable: ErrorSpec(503, "server_error", "rate_limits_unavailable", retry_after_s=1),
    EngineTimeout: ErrorSpec(504, "server_error", "engine_timeout"),
    # the configuration and the rollout state disagree (an admin call met a version that is
    # not configured): the server is at fault, and the message says what to fix
    ConfigError: ErrorSpec(500, "server_error", "server_misconfigured"),
    InvalidName: ErrorSpec(400, "invalid_request_error", "invalid_request"),
    CollectionNotFound: ErrorSpec(404, "invalid_request_error", "collection_not_found"),
    DocumentNotFound: ErrorSpec(404, "invalid_request_error", "document_not_found"),
    CollectionExists: ErrorSpec(409, "invalid_request_error", "collection_exists"),
    DeployRefused: ErrorSpec(422, "invalid_request_error", "deploy_refused"),
    DeployInProgress: ErrorSpec(409, "invalid_request_error", "deploy_in_progress"),
    RetrievalError: ErrorSpec(502, "server_error", "retrieval_error"),
    RetrievalUnavailable: ErrorSpec(503, "server_error", "retrieval_unavailable", retry_after_s=1),
    StoreUnavailable: ErrorSpec(503, "server_error", "retrieval_unavailable", retry_after_s=1),
    ShardUnavailable: ErrorSpec(503, "server_error", "retrieval_unavailable", retry_after_s=1),
    # an index worker's answer to a call without the gateways' token (retrieval.worker_http)
    WorkerUnauthenticated: ErrorSpec(401, "authentication_error", "invalid_worker_token"),
    ResponseNotFound: ErrorSpec(404, "invalid_request_error", "response_not_found"),
    ResponsesUnavailable: ErrorSpec(503, "server_error", "responses_unavailable", retry_after_s=1),
    FileNotFound: ErrorSpec(404, "invalid_request_error", "file_not_found"),
    BatchNotFound: ErrorSpec(404, "invalid_request_error", "batch_not_found"),
    BatchesUnavailable: ErrorSpec(503, "server_error", "batches_unavailable", retry_after_s=1),
    StorageQuotaExceeded: ErrorSpec(400, "invalid_request_error", "storage_quota_exceeded"),
}
INTERNAL = ErrorSpec(500, "server_error", "internal_error")


def answered_by(exc: BaseException, version: str) -> None:
    """Mark ``exc`` as raised once ``version`` was chosen to answer: ``render`` gives it
    the ``x-weir-model-version`` header, as answers have."""
    exc.weir_version = version  # type: ignore[attr-defined]


def spec_for(exc: BaseException) -> ErrorSpec | None:
    for cls in type(exc).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    return None


def render(exc: BaseException, request_id: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Status, OpenAI error body and extra headers for ``exc``."""
    spec = spec_for(exc)
    if spec is None:
        spec = INTERNAL
        message = f"Internal error; quote request id {request_id} when reporting it."
        param = None
    else:
        message = getattr(exc, "message", None) or str(exc)
        param = getattr(exc, "param", None)
    body = {"error": {"message": message, "type": spec.type, "param": param, "code": spec.code}}
    retry_after = getattr(exc, "retry_after_s", None) or spec.retry_after_s
    headers = {"retry-after": str(retry_after)} if retry_after else {}
    extra = getattr(exc, "headers", None) if isinstance(exc, GatewayError) else None
    if isinstance(extra, dict):
        headers.update(extra)
    version = getattr(exc, "weir_version", None)
    if isinstance(version, str):
        headers[VERSION_HEADER] = version
    return spec.status, body, headers
