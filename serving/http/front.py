"""The gateway's front door: one pure ASGI layer in front of every route.

``Front`` does, in this order and in one pass over the request's headers: the request id
(a sane incoming ``x-request-id`` or a new one, echoed on the response), the server span
for ``/v1`` requests (only when tracing exports), the body size limit (by Content-Length
before reading, else while reading), API keys, and turns whatever escapes the routes into
a 500 ``internal_error``, never a traceback. Then the request goes to the inference lane
(``serving.http.lane``, the three model routes) or to the FastAPI application (the rest).
Streams pass through untouched.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
from collections.abc import Sequence
from typing import Protocol

import orjson
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
from serving.observe.tracing import extract, recording, span

log = logging.getLogger("weir.gateway")
REQUEST_ID = "x-request-id"
_SAFE_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})  # metrics carry no secrets
ADMIN_PREFIX = "/weir/admin/"
TRACED_PREFIX = "/v1/"


class Lane(Protocol):
    """What serves some requests without the framework (``serving.http.lane.InferenceLane``)."""

    def serves(self, scope: Scope) -> bool: ...

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None: ...


def request_id_of(scope: Scope) -> str:
    state = scope.get("state") or {}
    return str(state.get("request_id", "-"))


def new_request_id() -> str:
    return os.urandom(16).hex()  # a uuid4's worth of randomness, without building a UUID


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


class Keys:
    """``Authorization: Bearer KEY`` on every route but the probes.

    Static keys (``gateway.api_keys``) are compared in constant time, against every key so
    that timing says nothing; store keys are looked up by their sha256. ``/weir/admin/``
    takes the admin key only. Keys never appear in errors or logs.
    """

    def __init__(
        self,
        keys: Sequence[str],
        store: KeyStore | None = None,
        admin_key: str | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        # a static key is its own cache tenant, known by a short hash (made once, here)
        self.static = [(k.encode(), hash_secret(k)[:12]) for k in keys]
        self.store = store
        self.admin_key = admin_key.encode() if admin_key else None
        self.tracer = recording(tracer)

    async def check(self, scope: Scope, authorization: bytes) -> BaseException | None:
        """None when the request may go on (``state`` then says who it is), else the error."""
        path = scope["path"]
        if path in OPEN_PATHS:
            return None
        token = _bearer(authorization)
        if path.startswith(ADMIN_PREFIX):
            if self.admin_key is None:
                return PermissionDenied("The admin API is off: set keys.admin_key.")
            if token is None or not hmac.compare_digest(token, self.admin_key):
                return Unauthenticated("Missing or invalid admin key.")
            return None
        if not self.static and self.store is None:
            return None
        denied = Unauthenticated("Missing or invalid API key.")
        if token is None:
            return denied
        tenant = None
        for key, short in self.static:
            if hmac.compare_digest(token, key):
                tenant = short
        if tenant is not None:
            scope["state"]["static_key"] = tenant
            return None
        if self.store is None:
            return denied
        try:
            with span(self.tracer, "weir.auth"):
                record = await self.store.lookup(token.decode(errors="replace"))
        except KeyStoreUnavailable:
            log.error("key store unreachable for request %s", request_id_of(scope))
            return AuthUnavailable("The key store is unreachable.")
        if record is None or record.revoked:
            return denied
        scope["state"]["key"] = record
        return None


def _bearer(authorization: bytes) -> bytes | None:
    scheme, _, token = authorization.partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token:
        return None
    return token


class Front:
    """Request id, span, body limit, keys and the last word on errors; then lane or app."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        keys: Keys,
        max_body_bytes: int,
        tracer: Tracer | None = None,
        lane: Lane | None = None,
    ) -> None:
        self.app = app
        self.keys = keys
        self.max_bytes = max_body_bytes
        self.tracer = recording(tracer)
        self.lane = lane

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = authorization = length = b""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                incoming = value
            elif name == b"authorization":
                authorization = value
            elif name == b"content-length":
                length = value
        rid = incoming.decode() if incoming and _SAFE_ID.match(incoming) else new_request_id()
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        state["request_id"] = rid
        id_header = (b"x-request-id", rid.encode())
        started = False

        async def send_out(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", ()), id_header]
            await send(message)

        try:
            if self.tracer is not None and scope["path"].startswith(TRACED_PREFIX):
                await self._traced(scope, receive, send_out, authorization, length)
            else:
                await self._serve(scope, receive, send_out, authorization, length)
        except Exception as exc:
            log.exception("unhandled error in request %s", rid)
            if not started:
                await send_error(send_out, exc, rid)

    async def _traced(
        self, scope: Scope, receive: Receive, send: Send, authorization: bytes, length: bytes
    ) -> None:
        assert self.tracer is not None
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

            await self._serve(scope, receive, traced_send, authorization, length)

    async def _serve(
        self, scope: Scope, receive: Receive, send: Send, authorization: bytes, length: bytes
    ) -> None:
        rid = scope["state"]["request_id"]
        if length.isdigit() and int(length) > self.max_bytes:
            await send_error(send, self._too_large(), rid)
            return
        refused = await self.keys.check(scope, authorization)
        if refused is not None:
            await send_error(send, refused, rid)
            return
        if self.lane is not None and self.lane.serves(scope):
            await self.lane(scope, receive, send)  # it reads the body under the same limit
            return
        await self._limited(scope, receive, send)

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"Request body is larger than {self.max_bytes} bytes.")

    async def _limited(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app, with the body counted as it is read: 413 the moment it passes the limit."""
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
                    await send_error(send, self._too_large(), request_id_of(scope))
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not answered:
                await send(message)

        await self.app(scope, counting_receive, guarded_send)
