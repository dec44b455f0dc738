"""The use case behind every OpenAI route: resolve, check the contract, pick, call, clean.

Routes stay thin: they validate the body (``serving.protocol``) and hand it here with the
``Route`` that says which engine path serves it, which task the model must have, how the
contract prepares it and how the answer is cleaned. Errors are raised, never returned.
The engine call is cancelled the moment the client disconnects.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from models.fleet import Fleet
from models.registry import Registry, split_name
from models.tokenizer import TokenCounter
from models.types import ServedVersion, Task
from serving import contract, output_check, responses, streaming
from serving.disconnect import SSEResponse, run_or_cancel
from serving.errors import InvalidModelOutput, InvalidRequest, PermissionDenied, WrongTask
from serving.keys.records import KeyRecord
from serving.limits.limiter import UNLIMITED_TICKET, Limiter, Ticket, Unlimited
from serving.limits.plan import plan, reservation_size
from serving.middleware import request_id_of
from serving.protocol.requests import ModelRequest
from serving.settings import ContractConfig

JSON = dict[str, Any]
Cleaner = Callable[[JSON, str, ServedVersion], JSON]
Preparer = Callable[[Any, TokenCounter | None, ContractConfig], contract.Prepared]
VERSION_HEADER = "x-weir-model-version"
OUTPUT_VALID_HEADER = "x-weir-output-valid"
TASK_NAMES = {"chat": "a chat model", "embed": "an embedding model"}
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


@dataclass(frozen=True)
class Route:
    path: str
    task: Task
    prepare: Preparer
    clean: Cleaner
    streams: bool = True


CHAT = Route("/v1/chat/completions", "chat", contract.prepare_chat, responses.clean_generation)
COMPLETIONS = Route(
    "/v1/completions", "chat", contract.prepare_completion, responses.clean_generation
)
EMBEDDINGS = Route(
    "/v1/embeddings",
    "embed",
    contract.prepare_embeddings,
    responses.clean_embeddings,
    streams=False,
)


class JSONBytes(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class Proxy:
    def __init__(
        self,
        registry: Registry,
        fleet: Fleet,
        counters: Mapping[str, TokenCounter],
        config: ContractConfig,
        limiter: Limiter | None = None,
        model_tpm: Mapping[str, int] | None = None,
    ) -> None:
        self.registry = registry
        self.fleet = fleet
        self.counters = counters
        self.config = config
        self.limiter = limiter
        self.model_tpm = model_tpm or {}

    def __repr__(self) -> str:
        return f"Proxy(registry={self.registry!r}, fleet={self.fleet!r})"

    async def handle(self, route: Route, request: ModelRequest, http: Request) -> Response:
        requested = request.model
        key: KeyRecord | None = getattr(http.state, "key", None)
        if key is not None and not key.allows(split_name(requested)[0]):
            # said before the registry is asked: no hint whether the model exists
            raise PermissionDenied("This API key may not use the requested model.", param="model")
        served = self.registry.resolve(requested)
        if served.task != route.task:
            raise WrongTask(
                f"The model '{requested}' is {TASK_NAMES[served.task]}; "
                f"it does not serve {route.path}.",
                param="model",
            )
        if request.stream and not route.streams:
            raise InvalidRequest(f"{route.path} does not stream", param="stream")
        prepared = route.prepare(request, self.counters.get(served.key), self.config)
        http.state.prompt_tokens = prepared.prompt_tokens
        ticket = await self._admit(key, served, prepared, getattr(request, "n", 1) or 1)
        http.state.ticket = ticket
        try:
            return await self._serve(route, request, http, served, prepared, ticket)
        except BaseException:
            ticket.finish(None)  # failed, timed out or cancelled before an answer: release
            raise

    async def _admit(
        self, key: KeyRecord | None, served: ServedVersion, prepared: contract.Prepared, n: int
    ) -> Ticket | Unlimited:
        if self.limiter is None:
            return UNLIMITED_TICKET
        tokens = reservation_size(prepared.prompt_tokens, prepared.max_tokens, n)
        checks = plan(key, served.model, tokens, self.model_tpm.get(served.model))
        return await self.limiter.admit(served.model, checks)

    async def _serve(
        self,
        route: Route,
        request: ModelRequest,
        http: Request,
        served: ServedVersion,
        prepared: contract.Prepared,
        ticket: Ticket | Unlimited,
    ) -> Response:
        requested = request.model
        replica = self.fleet.pick(served)
        body = prepared.body
        body["model"] = replica.served_name
        headers = {VERSION_HEADER: served.version, **ticket.headers}

        if request.stream:
            options = body.get("stream_options") or {}
            wants_usage = bool(options.get("include_usage"))
            body["stream_options"] = {**options, "include_usage": True}  # what settles limits
            used: list[int] = []

            def fix(chunk: JSON) -> JSON | None:
                usage = chunk.get("usage")
                if isinstance(usage, dict) and isinstance(usage.get("total_tokens"), int):
                    used.append(usage["total_tokens"])
                if not wants_usage:
                    if usage and not chunk.get("choices"):
                        return None
                    chunk.pop("usage", None)
                return route.clean(chunk, requested, served)

            def ended(ok: bool) -> None:
                ticket.finish((used[-1] if used else ticket.reserved) if ok else None)

            stream = await run_or_cancel(replica.engine.open_stream(route.path, body), http.receive)
            events = streaming.relay(stream, fix, request_id_of(http.scope), ended)
            return SSEResponse(
                events, headers=headers | SSE_HEADERS, on_close=lambda: ticket.finish(None)
            )

        answer = await run_or_cancel(replica.engine.complete(route.path, body), http.receive)
        ticket.finish(_total_tokens(answer, ticket.reserved))
        schema = output_check.schema_of(body.get("response_format"))
        if schema is not None:
            try:
                output_check.check_chat_output(answer, schema)
                headers[OUTPUT_VALID_HEADER] = "true"
            except InvalidModelOutput:
                if self.config.invalid_output == "reject":
                    raise
                headers[OUTPUT_VALID_HEADER] = "false"
        return JSONBytes(route.clean(answer, requested, served), headers=headers)


def _total_tokens(answer: JSON, fallback: int) -> int:
    """What the engine says the request used; the reservation if it does not say."""
    usage = answer.get("usage")
    total = usage.get("total_tokens") if isinstance(usage, dict) else None
    return total if isinstance(total, int) else fallback
