"""The model routes: ``POST /v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``,
and vLLM's ``/v1/rerank``, ``/v1/score``, ``/tokenize``, ``/detokenize`` passed through.

Nearly all of a gateway's traffic, so served without dependency injection: the body is
read once (``Front`` has already bounded it), validated from bytes by the models in
``serving.protocol``, turned with the request's ``Call`` into the use case's input, and
the ``Answer`` rendered. Errors propagate to ``Front``, which renders them with the one
table. The OpenAPI document lists these routes from the same table (``openapi_routes``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message as MimeMessage
from typing import Any

from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.routing import Route as StarletteRoute
from starlette.types import Receive, Scope, Send

from serving.cache.entries import CONTROL_HEADER
from serving.core.call import Call
from serving.core.disconnect import DisconnectSignal
from serving.core.passthrough import DETOKENIZE, RERANK, SCORE, TOKENIZE
from serving.core.proxy import CHAT, COMPLETIONS, EMBEDDINGS, PIN_HEADER, Proxy, Route
from serving.errors import GatewayError, InvalidRequest, MethodNotAllowed
from serving.http.front import caller_of, request_id_of
from serving.http.rendering import disconnected, respond
from serving.http.routes.openapi_errors import GENERATION_ERRORS
from serving.http.validation import invalid_request_from_errors
from serving.protocol.passthrough import (
    DetokenizeRequest,
    RerankRequest,
    ScoreRequest,
    TokenizeRequest,
)
from serving.protocol.requests import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ModelRequest,
)

_PIN = PIN_HEADER.encode()
_CONTROL = CONTROL_HEADER.encode()


def edge_call(
    scope: Scope, receive: Receive, body_bytes: int | None = None
) -> tuple[Call, DisconnectSignal]:
    """The use case's ``Call`` for a request at the edge: the caller, its pinned version
    and cache control headers, and the client's disconnect signal (one reader for the
    engine call and the stream), which the endpoint closes when the request is over."""
    pin = control = None
    for name, value in scope["headers"]:
        if name == _PIN:
            pin = value.decode("latin-1")
        elif name == _CONTROL:
            control = value.decode("latin-1")
    left = disconnected(receive)
    call = Call(caller_of(scope), request_id_of(scope), left, pin, control, body_bytes=body_bytes)
    return call, left


@dataclass(frozen=True)
class ModelRoute:
    route: Route
    model: type[ModelRequest]
    summary: str


MODEL_ROUTES = (
    ModelRoute(CHAT, ChatCompletionRequest, "Create a chat completion (JSON or SSE)"),
    ModelRoute(COMPLETIONS, CompletionRequest, "Create a text completion (JSON or SSE)"),
    ModelRoute(EMBEDDINGS, EmbeddingRequest, "Create embeddings"),
    ModelRoute(RERANK, RerankRequest, "Rerank documents by relevance to a query (vLLM's)"),
    ModelRoute(SCORE, ScoreRequest, "Score text pairs (vLLM's)"),
    ModelRoute(TOKENIZE, TokenizeRequest, "Tokenize a prompt or messages (vLLM's)"),
    ModelRoute(DETOKENIZE, DetokenizeRequest, "Detokenize token ids (vLLM's)"),
)
MODEL_PATHS = frozenset(spec.route.path for spec in MODEL_ROUTES)


Refused = Callable[[str, BaseException], None]


def _not_counted(path: str, error: BaseException) -> None:
    return None


@dataclass(frozen=True)
class Edge:
    """What the model routes take from the gateway's settings and metrics."""

    send_timeout_s: float | None = None  # gateway.client_send_timeout_s
    refused: Refused = _not_counted  # counts a refusal the use case never saw


class ModelEndpoint:
    """The ASGI endpoint of one model route."""

    def __init__(
        self, spec: ModelRoute, proxy: Callable[[], Proxy], edge: Edge | None = None
    ) -> None:
        self.route = spec.route
        self.model = spec.model
        self.proxy = proxy  # made by the app's lifespan, so looked up per request
        self.edge = edge or Edge()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            read = await self._request(scope, receive)
        except GatewayError as exc:  # refused before the use case saw it: counted here
            self.edge.refused(scope["path"], exc)
            raise
        if read is None:
            return  # the client left while sending (or was refused a too-large body)
        request, size = read
        call, left = edge_call(scope, receive, size)
        try:
            answer = await self.proxy().handle(self.route, request, call)
            await respond(answer, left, self.edge.send_timeout_s)(scope, receive, send)
        finally:
            left.close()

    async def _request(self, scope: Scope, receive: Receive) -> tuple[ModelRequest, int] | None:
        """The validated body and its size in bytes; None when the client left before
        sending all of it."""
        if scope["method"] != "POST":
            raise MethodNotAllowed(
                f"Method {scope['method']} is not allowed on {scope['path']}.", allow=["POST"]
            )
        raw = await read_body(receive)
        if raw is None:
            return None
        content_type = None
        for name, value in scope["headers"]:
            if name == b"content-type":
                content_type = value.decode("latin-1")
        return parse(self.model, raw, content_type), len(raw)


def routes(proxy: Callable[[], Proxy], edge: Edge | None = None) -> list[StarletteRoute]:
    """The model routes for the router; every method reaches them (others get a 405)."""
    return [
        StarletteRoute(spec.route.path, ModelEndpoint(spec, proxy, edge), methods=None)
        for spec in MODEL_ROUTES
    ]


def openapi_routes() -> list[APIRoute]:
    """The model routes as FastAPI describes them, for the OpenAPI document only (the
    router serves them through ``ModelEndpoint``)."""
    return [
        APIRoute(
            spec.route.path,
            _described(spec.model),
            methods=["POST"],
            summary=spec.summary,
            responses=GENERATION_ERRORS,
        )
        for spec in MODEL_ROUTES
    ]


def _described(model: type[ModelRequest]) -> Callable[..., Any]:
    async def endpoint(body: Any) -> Any:  # never called: see openapi_routes
        raise NotImplementedError

    body = inspect.Parameter("body", inspect.Parameter.KEYWORD_ONLY, annotation=model)
    endpoint.__signature__ = inspect.Signature([body])  # type: ignore[attr-defined]
    return endpoint


async def read_body(receive: Receive) -> bytes | None:
    """The whole body, or None when the client disconnected first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def parse(model: type[ModelRequest], raw: bytes, content_type: str | None) -> ModelRequest:
    """The body as ``model``, or the ``InvalidRequest`` that says what is wrong with it."""
    if not raw.strip():
        raise InvalidRequest("The request body is empty; a JSON object is required.")
    if content_type is not None and not _is_json(content_type):
        raise InvalidRequest(
            f"The request body must be JSON (Content-Type: application/json), not {content_type}."
        )
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise invalid_request_from_errors(exc.errors()) from None


def _is_json(content_type: str) -> bool:
    if content_type.startswith("application/json"):
        return True
    mime = MimeMessage()
    mime["content-type"] = content_type
    subtype = mime.get_content_subtype()
    return mime.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )
