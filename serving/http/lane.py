"""The inference lane: ``POST`` on the three model routes, served without the framework.

Chat completions, completions and embeddings are nearly all of a gateway's traffic, and
for them FastAPI's routing, dependency injection and exception layers cost as much CPU
as the work itself. ``Front`` hands these requests here after the request id, span,
body limit (by Content-Length) and key checks: the lane reads the body (under the same
limit), validates it with the same pydantic models the routes declare, calls the same
``Proxy.handle`` and sends the answer, turning errors into HTTP with the one table
(``serving.errors``). The FastAPI routes stay for the OpenAPI schema and any other method.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from email.message import Message as MimeMessage

import orjson
from pydantic import ValidationError
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from models.errors import WeirModelError
from retrieval.service import RetrievalError
from serving.core.answer import JSONBytes
from serving.core.proxy import CHAT, COMPLETIONS, EMBEDDINGS, Proxy, Route
from serving.errors import ClientClosed, GatewayError, InvalidRequest, PayloadTooLarge, render
from serving.http.front import request_id_of
from serving.http.validation import invalid_request_from_errors
from serving.protocol.requests import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ModelRequest,
)

log = logging.getLogger("weir.gateway")
ROUTES: dict[str, tuple[Route, type[ModelRequest]]] = {
    CHAT.path: (CHAT, ChatCompletionRequest),
    COMPLETIONS.path: (COMPLETIONS, CompletionRequest),
    EMBEDDINGS.path: (EMBEDDINGS, EmbeddingRequest),
}
# what the routes answer for themselves; everything else reaching the lane is a bug -> 500
HANDLED = (WeirModelError, GatewayError, RetrievalError)


class InferenceLane:
    def __init__(self, proxy: Callable[[], Proxy], max_body_bytes: int) -> None:
        self.proxy = proxy  # made by the app's lifespan, so looked up per request
        self.max_bytes = max_body_bytes

    def serves(self, scope: Scope) -> bool:
        return scope["method"] == "POST" and scope["path"] in ROUTES

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route, model = ROUTES[scope["path"]]
        http = Request(scope, receive)
        try:
            raw = await self._body(receive)
            if raw is None:
                return  # the client left while sending; nobody to answer
            request = parse(model, raw, _content_type(scope))
            response = await self.proxy().handle(route, request, http)
        except HANDLED as exc:
            if isinstance(exc, ClientClosed):
                log.info("client closed request %s before the answer", request_id_of(scope))
            status, body, headers = render(exc, request_id_of(scope))
            response = JSONBytes(body, status_code=status, headers=headers)
        await response(scope, receive, send)

    async def _body(self, receive: Receive) -> bytes | None:
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_bytes:
                raise PayloadTooLarge(f"Request body is larger than {self.max_bytes} bytes.")
            chunks.append(chunk)
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
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("The request body is not valid JSON.") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid_request_from_errors(exc.errors()) from None


def _content_type(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"content-type":
            return str(value.decode("latin-1"))
    return None


def _is_json(content_type: str) -> bool:
    if content_type.startswith("application/json"):
        return True
    mime = MimeMessage()
    mime["content-type"] = content_type
    subtype = mime.get_content_subtype()
    return mime.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )
