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
from collections.abc import Callable, Mapping, Sequence

from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.core.call import ANONYMOUS, Caller
from serving.errors import (
    AuthUnavailable,
    ClientClosed,
    GatewayError,
    PayloadTooLarge,
    PermissionDenied,
    Unauthenticated,
    spec_for,
)
from serving.http.rendering import as_ours, send_error
from serving.keys.records import hash_secret
from serving.keys.store import KeyStore, KeyStoreUnavailable
from serving.observe.tracing import extract, recording, span

log = logging.getLogger("weir.gateway")
REQUEST_ID = "x-request-id"
_SAFE_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})  # metrics carry no secrets
ADMIN_PREFIX = "/weir/admin/"
ADMIN_TOO = frozenset({"/weir/engines"})  # tenant keys get less there; the admin key all
TRACED_PREFIX = "/v1/"


def request_id_of(scope: Scope) -> str:
    state = scope.get("state") or {}
    return str(state.get("request_id", "-"))


def new_request_id() -> str:
    return os.urandom(16).hex()  # a uuid4's worth of randomness, without building a UUID


def caller_of(scope: Scope) -> Caller:
    """Who the request is from, as ``Keys`` found it."""
    caller: Caller = (scope.get("state") or {}).get("caller", ANONYMOUS)
    return caller


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
        self.static = [(k.encode(), Caller(static_key=hash_secret(k)[:12])) for k in keys]
        self.store = store
        self.admin_key = admin_key.encode() if admin_key else None
        self.tracer = recording(tracer)

    async def check(self, scope: Scope, authorization: bytes) -> Caller:
        """Who asks (what ``state["caller"]`` then says); raises ``Unauthenticated``,
        ``PermissionDenied`` or ``AuthUnavailable`` when the request may not go on."""
        path = scope["path"]
        if path in OPEN_PATHS:
            return ANONYMOUS
        token = _bearer(authorization)
        if path.startswith(ADMIN_PREFIX):
            if self.admin_key is None:
                raise PermissionDenied("The admin API is off: set keys.admin_key.")
            if token is None or not hmac.compare_digest(token, self.admin_key):
                raise Unauthenticated("Missing or invalid admin key.")
            return ANONYMOUS
        if not self.static and self.store is None:
            return ANONYMOUS
        if (
            path in ADMIN_TOO
            and self.admin_key is not None
            and token is not None
            and hmac.compare_digest(token, self.admin_key)
        ):
            return ANONYMOUS  # the route itself checks the admin key for its full view
        if token is None:
            raise Unauthenticated("Missing or invalid API key.")
        found = None
        for key, caller in self.static:  # every key compared: the time says nothing
            if hmac.compare_digest(token, key):
                found = caller
        if found is not None:
            return found
        if self.store is None:
            raise Unauthenticated("Missing or invalid API key.")
        try:
            with span(self.tracer, "weir.auth"):
                record = await self.store.lookup(token.decode(errors="replace"))
        except KeyStoreUnavailable:
            log.error("key store unreachable for request %s", request_id_of(scope))
            raise AuthUnavailable("The key store is unreachable.") from None
        if record is None or record.revoked:
            raise Unauthenticated("Missing or invalid API key.")
        return Caller(key=record)


def _bearer(authorization: bytes) -> bytes | None:
    scheme, _, token = authorization.partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token:
        return None
    return token


class Front:
    """Request id, span, body limit, keys and the last word on errors; then the router."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        keys: Keys,
        max_body_bytes: int,
        tracer: Tracer | None = None,
        refused: Callable[[str, BaseException], None] | None = None,
        body_limits: Mapping[str, int] | None = None,
    ) -> None:
        self.app = app
        self.keys = keys
        self.max_bytes = max_body_bytes
        self.body_limits = dict(body_limits or {})  # paths with their own (file uploads)
        self.tracer = recording(tracer)
        self.refused = refused  # counts what is refused here (size, key) in the metrics

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
            error = as_ours(exc, scope)
            if isinstance(error, ClientClosed):
                log.info("client closed request %s before the answer", rid)
            elif spec_for(error) is None:
                log.exception("unhandled error in request %s", rid)
            if not started:
                await send_error(send_out, error, rid)

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
        limit = self.body_limits.get(scope["path"], self.max_bytes)
        try:
            if length.isdigit():
                if int(length) > limit:
                    raise self._too_large(limit)
                # the server reads no more than Content-Length: the body is within the limit
            else:
                receive, send = self._counted(scope, receive, send, limit)
            scope["state"]["caller"] = await self.keys.check(scope, authorization)
        except GatewayError as exc:
            if self.refused is not None:
                self.refused(scope["path"], exc)
            raise
        await self.app(scope, receive, send)

    def _too_large(self, limit: int) -> PayloadTooLarge:
        return PayloadTooLarge(f"Request body is larger than {limit} bytes.")

    def _counted(
        self, scope: Scope, receive: Receive, send: Send, limit: int
    ) -> tuple[Receive, Send]:
        """A body of unknown length, counted as it is read: 413 the moment it passes the
        limit; the route then sees a disconnect and whatever it sends is dropped."""
        seen = 0
        answered = False

        async def counting_receive() -> Message:
            nonlocal seen, answered
            message = await receive()
            if message["type"] == "http.request" and not answered:
                seen += len(message.get("body", b""))
                if seen > limit:
                    answered = True
                    refusal = self._too_large(limit)
                    if self.refused is not None:
                        self.refused(scope["path"], refusal)
                    await send_error(send, refusal, request_id_of(scope))
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not answered:
                await send(message)

        return counting_receive, guarded_send
