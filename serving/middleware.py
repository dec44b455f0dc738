"""Pure ASGI middleware: request ids, unhandled errors, body size and API keys.

Each runs before the body is parsed and passes streams through untouched.
"""

from __future__ import annotations

import hmac
import logging
import re
import uuid
from collections.abc import Sequence

import orjson
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.errors import (
    AuthUnavailable,
    PayloadTooLarge,
    PermissionDenied,
    Unauthenticated,
    render,
)
from serving.keys.records import hash_secret
from serving.keys.store import KeyStore, KeyStoreUnavailable
from serving.observe.tracing import extract

log = logging.getLogger("weir.gateway")
REQUEST_ID = "x-request-id"
_SAFE_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")


def request_id_of(scope: Scope) -> str:
    state = scope.get("state") or {}
    return str(state.get("request_id", "-"))


async def send_error(send: Send, exc: BaseException, request_id: str) -> None:
    status, body, headers = render(exc, request_id)
    raw = orjson.dumps(body)
    header_list = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(raw)).encode()),
    ]
    header_list += [(k.encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": header_list})
    await send({"type": "http.response.body", "body": raw})


class RequestIdMiddleware:
    """Honour a sane incoming ``x-request-id`` or make one; echo it on the response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(REQUEST_ID.encode(), b"")
        rid = incoming.decode() if _SAFE_ID.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        header = (REQUEST_ID.encode(), rid.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        await self.app(scope, receive, send_with_id)


class UnhandledErrorMiddleware:
    """Whatever escapes the routes becomes a 500 ``internal_error``, never a traceback."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            rid = request_id_of(scope)
            log.exception("unhandled error in request %s", rid)
            if not started:
                await send_error(send, exc, rid)


class BodyLimitMiddleware:
    """413 for bodies over ``max_bytes``: by Content-Length before reading, else while reading."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = PayloadTooLarge(f"Request body is larger than {self.max_bytes} bytes.")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await send_error(send, too_large, request_id_of(scope))
            return
        seen = 0
        answered = False

        async def counting_receive() -> Message:
            nonlocal seen, answered
            message = await receive()
            if message["type"] == "http.request" and not answered:
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # Answer now; the app sees a disconnect and whatever it sends is dropped.
                    answered = True
                    await send_error(send, too_large, request_id_of(scope))
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not answered:
                await send(message)

        await self.app(scope, counting_receive, guarded_send)


OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})  # metrics carry no secrets
ADMIN_PREFIX = "/weir/admin/"


class TracingMiddleware:
    """A server span per ``/v1`` request, continuing an incoming W3C ``traceparent``.

    The span stays current for the whole exchange, streams included, so the gateway's
    own spans (auth, limits, engine) nest under it and the engine call carries it on.
    """

    def __init__(self, app: ASGIApp, tracer: Tracer, prefix: str = "/v1/") -> None:
        self.app = app
        self.tracer = tracer
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        name = f"{scope['method']} {scope['path']}"
        with self.tracer.start_as_current_span(
            name, context=extract(carrier), kind=SpanKind.SERVER
        ) as span:
            span.set_attribute("http.request.method", scope["method"])
            span.set_attribute("url.path", scope["path"])
            span.set_attribute("weir.request_id", request_id_of(scope))

            async def traced_send(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status = int(message["status"])
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        span.set_status(Status(StatusCode.ERROR))
                await send(message)

            await self.app(scope, receive, traced_send)


def _bearer(scope: Scope) -> str | None:
    auth: bytes = dict(scope["headers"]).get(b"authorization", b"")
    scheme, _, token = auth.partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        return None
    return token.strip().decode(errors="replace")


class ApiKeyMiddleware:
    """``Authorization: Bearer KEY`` on every route but the probes.

    Static keys (``gateway.api_keys``) are compared in constant time; store keys are
    looked up by their sha256. The record of the key used goes to ``state["key"]``.
    ``/weir/admin/`` takes the admin key only. Keys never appear in errors or logs.
    """

    def __init__(
        self,
        app: ASGIApp,
        keys: Sequence[str],
        store: KeyStore | None = None,
        admin_key: str | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self.app = app
        self.tracer = tracer or trace.NoOpTracer()
        self.keys = [k.encode() for k in keys]
        self.store = store
        self.admin_key = admin_key.encode() if admin_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        rid = request_id_of(scope)
        token = _bearer(scope)
        if scope["path"].startswith(ADMIN_PREFIX):
            if self.admin_key is None:
                await send_error(
                    send, PermissionDenied("The admin API is off: set keys.admin_key."), rid
                )
                return
            if token is None or not hmac.compare_digest(token.encode(), self.admin_key):
                await send_error(send, Unauthenticated("Missing or invalid admin key."), rid)
                return
            await self.app(scope, receive, send)
            return
        if not self.keys and self.store is None:
            await self.app(scope, receive, send)
            return
        denied = Unauthenticated("Missing or invalid API key.")
        if token is None:
            await send_error(send, denied, rid)
            return
        matched = False
        for key in self.keys:  # compare against every key: timing says nothing
            matched |= hmac.compare_digest(token.encode(), key)
        if matched:
            # a static key is its own cache tenant, known by a short hash
            scope.setdefault("state", {})["static_key"] = hash_secret(token)[:12]
        else:
            if self.store is None:
                await send_error(send, denied, rid)
                return
            try:
                with self.tracer.start_as_current_span("weir.auth"):
                    record = await self.store.lookup(token)
            except KeyStoreUnavailable:
                log.error("key store unreachable for request %s", rid)
                await send_error(send, AuthUnavailable("The key store is unreachable."), rid)
                return
            if record is None or record.revoked:
                await send_error(send, denied, rid)
                return
            scope.setdefault("state", {})["key"] = record
        await self.app(scope, receive, send)
