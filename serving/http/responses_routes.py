"""The Responses API's routes: ``POST /v1/responses``, ``GET``/``DELETE
/v1/responses/{response_id}`` and ``GET /v1/responses/{response_id}/input_items``.

Served like the model routes (``serving.http.model_routes``): no dependency injection,
the body read once and validated from bytes, a ``Call`` for the use case
(``serving.responses.service``), the ``Answer`` rendered; errors propagate to ``Front``,
which renders them with the one table. The stored-response routes are scoped to the
caller's tenant. ``openapi_routes`` describes all four for the OpenAPI document.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from fastapi import Query
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.datastructures import QueryParams
from starlette.routing import Route as StarletteRoute
from starlette.types import Receive, Scope, Send

from serving.errors import InvalidRequest, MethodNotAllowed
from serving.http.front import caller_of
from serving.http.model_routes import Edge, edge_call, parse, read_body
from serving.http.rendering import JSONBytes, respond
from serving.http.routes.openapi_errors import GENERATION_ERRORS, errors
from serving.http.validation import invalid_request_from_errors
from serving.protocol.responses import InputItemsQuery, ResponseRequest
from serving.responses.service import Responses

PATH = "/v1/responses"
ONE = PATH + "/{response_id}"
INPUT_ITEMS = ONE + "/input_items"
Service = Callable[[], Responses]
STORED_ERRORS = errors(400, 401, 404, 405, 503)


def _allow(scope: Scope, *methods: str) -> None:
    if scope["method"] not in methods:
        raise MethodNotAllowed(
            f"Method {scope['method']} is not allowed on {scope['path']}.", allow=methods
        )


def _content_type(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"content-type":
            return str(value.decode("latin-1"))
    return None


class CreateEndpoint:
    """``POST /v1/responses``."""

    def __init__(self, service: Service, edge: Edge) -> None:
        self.service = service
        self.edge = edge

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        _allow(scope, "POST")
        raw = await read_body(receive)
        if raw is None:
            return  # the client left while sending
        request = cast(ResponseRequest, parse(ResponseRequest, raw, _content_type(scope)))
        call, left = edge_call(scope, receive)  # as on the chat route
        try:
            answer = await self.service().create(request, call)
            await respond(answer, left, self.edge.send_timeout_s)(scope, receive, send)
        finally:
            left.close()


class StoredEndpoint:
    """``GET`` and ``DELETE /v1/responses/{response_id}``."""

    def __init__(self, service: Service) -> None:
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        _allow(scope, "GET", "DELETE")
        tenant, response_id = caller_of(scope).tenant, scope["path_params"]["response_id"]
        if scope["method"] == "DELETE":
            body = await self.service().delete(tenant, response_id)
        else:
            query = QueryParams(scope["query_string"])
            if query.get("stream", "false").lower() not in ("false", "0"):
                raise InvalidRequest(
                    "Streaming a stored response is not supported; it is complete.",
                    param="stream",
                )
            body = await self.service().get(tenant, response_id)
        await JSONBytes(body)(scope, receive, send)


class InputItemsEndpoint:
    """``GET /v1/responses/{response_id}/input_items``."""

    def __init__(self, service: Service) -> None:
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        _allow(scope, "GET")
        query = QueryParams(scope["query_string"])
        try:
            asked = InputItemsQuery.model_validate(
                {k: query[k] for k in ("limit", "order", "after") if k in query}
            )
        except ValidationError as exc:
            raise invalid_request_from_errors(exc.errors()) from None
        tenant, response_id = caller_of(scope).tenant, scope["path_params"]["response_id"]
        body = await self.service().input_items(tenant, response_id, asked)
        await JSONBytes(body)(scope, receive, send)


def routes(service: Service, edge: Edge | None = None) -> list[StarletteRoute]:
    """The four routes for the router; every method reaches them (others get a 405)."""
    return [
        StarletteRoute(PATH, CreateEndpoint(service, edge or Edge()), methods=None),
        StarletteRoute(ONE, StoredEndpoint(service), methods=None),
        StarletteRoute(INPUT_ITEMS, InputItemsEndpoint(service), methods=None),
    ]


def openapi_routes() -> list[APIRoute]:
    """The routes as FastAPI describes them, for the OpenAPI document only."""

    async def create(body: ResponseRequest) -> Any:  # never called: see the endpoints
        raise NotImplementedError

    async def one(response_id: str) -> Any:
        raise NotImplementedError

    async def items(
        response_id: str,
        limit: int = Query(20, ge=1, le=100),
        order: str = Query("desc", pattern="^(asc|desc)$"),
        after: str | None = None,
    ) -> Any:
        raise NotImplementedError

    return [
        APIRoute(
            PATH,
            create,
            methods=["POST"],
            summary="Create a model response (JSON or SSE)",
            responses=GENERATION_ERRORS,
        ),
        APIRoute(
            ONE, one, methods=["GET"], summary="Get a stored response", responses=STORED_ERRORS
        ),
        APIRoute(
            ONE,
            one,
            methods=["DELETE"],
            summary="Delete a stored response",
            responses=STORED_ERRORS,
        ),
        APIRoute(
            INPUT_ITEMS,
            items,
            methods=["GET"],
            summary="List a response's input items",
            responses=STORED_ERRORS,
        ),
    ]
