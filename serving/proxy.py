"""The use case behind every OpenAI route: resolve, pick a replica, call, clean.

Routes stay thin: they validate the body (``serving.protocol``) and hand it here with the
``Route`` that says which engine path serves it, which task the model must have, and how
the answer is cleaned. Errors are raised, never returned.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.responses import Response, StreamingResponse

from models.fleet import Fleet
from models.registry import Registry
from models.types import ServedVersion, Task
from serving import responses, streaming
from serving.errors import InvalidRequest, WrongTask
from serving.protocol.requests import ModelRequest

JSON = dict[str, Any]
Cleaner = Callable[[JSON, str, ServedVersion], JSON]
VERSION_HEADER = "x-weir-model-version"
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


@dataclass(frozen=True)
class Route:
    path: str
    task: Task
    clean: Cleaner
    streams: bool = True


CHAT = Route("/v1/chat/completions", "chat", responses.clean_generation)
COMPLETIONS = Route("/v1/completions", "chat", responses.clean_generation)
EMBEDDINGS = Route("/v1/embeddings", "embed", responses.clean_embeddings, streams=False)


class JSONBytes(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class Proxy:
    def __init__(self, registry: Registry, fleet: Fleet) -> None:
        self.registry = registry
        self.fleet = fleet

    def __repr__(self) -> str:
        return f"Proxy(registry={self.registry!r}, fleet={self.fleet!r})"

    async def handle(self, route: Route, request: ModelRequest, request_id: str) -> Response:
        requested: str = request.model
        served = self.registry.resolve(requested)
        if served.task != route.task:
            raise WrongTask(
                f"The model '{requested}' is a {served.task} model; "
                f"it does not serve {route.path}.",
                param="model",
            )
        replica = self.fleet.pick(served)
        body = request.model_dump(exclude_unset=True)
        body["model"] = replica.served_name
        headers = {VERSION_HEADER: served.version}
        if body.get("stream"):
            if not route.streams:
                raise InvalidRequest(f"{route.path} does not stream", param="stream")
            stream = await replica.engine.open_stream(route.path, body)

            def fix(chunk: JSON) -> JSON:
                return route.clean(chunk, requested, served)

            return StreamingResponse(
                streaming.relay(stream, fix, request_id),
                media_type="text/event-stream",
                headers=headers | SSE_HEADERS,
            )
        answer = await replica.engine.complete(route.path, body)
        return JSONBytes(route.clean(answer, requested, served), headers=headers)
