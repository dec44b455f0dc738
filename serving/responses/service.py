"""The Responses API's use case: a response is a chat completion, stored per tenant.

``create`` rebuilds the conversation (the stored chain of ``previous_response_id``, then
this request's input), asks ``Proxy.handle`` for the chat completion with the request's
``Call`` (so keys, limits, the cache, metrics, rollouts and the error table apply as to
any chat request), and answers with the ``Response`` object, or its stream of typed
events. With ``store`` (the default) the response is saved before its answer is given
(before ``response.completed`` in a stream), so another gateway sharing the store can
continue it at once.

A stored record is ``{"response", "input", "history"}``: the Response object, this
request's input items and the conversation before them (instructions are never carried
over, as OpenAI documents). A continuation reads one record. Records live
``responses.ttl_s`` under the caller's tenant; another tenant's id is a 404. A tenant
keeps at most ``responses.max_tenant_records`` records of ``max_tenant_bytes`` in all:
storing one past either evicts the tenant's oldest (the store does, as it writes), so a
request is never refused, nor its answer lost, for want of room; continuing an evicted
response is a 404 as an expired one is. A response request is a chat request to the
key's limits (``rpm`` and the rest), through the proxy.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

import orjson
from pydantic import ValidationError

from serving.core.answer import Answer, JsonAnswer, StreamAnswer
from serving.core.call import Call
from serving.core.proxy import CHAT, Proxy
from serving.errors import (
    GatewayError,
    InvalidRequest,
    ResponseNotFound,
    ResponsesUnavailable,
    spec_for,
)
from serving.protocol.requests import ChatCompletionRequest
from serving.protocol.responses import InputItemsQuery, ResponseRequest
from serving.responses import translate
from serving.responses.events import EventWriter, sse
from serving.responses.store import ResponseStore, make_response_store
from serving.settings import ResponsesConfig, Settings

log = logging.getLogger("weir.responses")
JSON = dict[str, Any]
# the chat request's fields as the Responses request names them (in error params)
PARAMS = {
    "messages": "input",
    "max_tokens": "max_output_tokens",
    "max_completion_tokens": "max_output_tokens",
    "response_format": "text.format",
}


class Responses:
    def __init__(
        self,
        proxy: Callable[[], Proxy],
        store: ResponseStore,
        config: ResponsesConfig,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.proxy = proxy  # made by the app's lifespan, so looked up per request
        self.store = store
        self.config = config
        self.clock = clock

    def __repr__(self) -> str:
        return f"Responses(store={self.store!r})"

    async def create(self, request: ResponseRequest, call: Call) -> Answer:
        _refuse_unsupported(request)
        items = translate.input_items(request)
        if len(items) > self.config.max_input_items:
            raise InvalidRequest(
                f"{len(items)} input items; at most {self.config.max_input_items} are allowed "
                "(responses.max_input_items).",
                param="input",
            )
        tenant = call.caller.tenant
        history: list[JSON] = []
        if request.previous_response_id is not None:
            previous = await self._record(tenant, request.previous_response_id)
            history = previous["history"] + previous["input"] + previous["response"]["output"]
        conversation = history + items
        self._check_chain(conversation)
        chat = _chat_request(translate.chat_body(request, conversation))
        response_id = translate.new_id("resp")
        created = int(self.clock())

        def snapshot(
            status: str, output: list[JSON], usage: JSON | None, error: JSON | None
        ) -> JSON:
            return translate.response_object(
                request, response_id, created, status=status, output=copy.deepcopy(output),
                usage_=usage, error=error, completed_at=int(self.clock()),
            )  # fmt: skip

        try:
            answer = await self.proxy().handle(CHAT, chat, call)
        except GatewayError as exc:
            _rename_param(exc)
            raise
        save = None
        if request.store is not False:

            async def save(response: JSON) -> None:
                record = {"response": response, "input": items, "history": history}
                await self.store.put(tenant, response_id, orjson.dumps(record), self.config.ttl_s)

        if isinstance(answer, StreamAnswer):
            events = _events(answer.events, EventWriter(snapshot), save, call.request_id)
            return StreamAnswer(events, answer.headers, on_close=answer.on_close)
        choices = answer.body.get("choices") or [{}]
        choice = choices[0]
        status = "incomplete" if choice.get("finish_reason") == "length" else "completed"
        output = translate.output_items(choice)
        response = snapshot(status, output, translate.usage(answer.body.get("usage")), None)
        if save is not None:
            await save(response)
        return JsonAnswer(response, answer.headers, answer.status)

    async def get(self, tenant: str, response_id: str) -> JSON:
        response: JSON = (await self._record(tenant, response_id))["response"]
        return response

    async def delete(self, tenant: str, response_id: str) -> JSON:
        if not await self.store.delete(tenant, response_id):
            raise _not_found(response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    async def input_items(self, tenant: str, response_id: str, query: InputItemsQuery) -> JSON:
        items: list[JSON] = (await self._record(tenant, response_id))["input"]
        if query.order == "desc":
            items = items[::-1]
        if query.after is not None:
            ids = [item.get("id") for item in items]
            if query.after not in ids:
                raise InvalidRequest(
                    f"No input item '{query.after}' in response '{response_id}'.", param="after"
                )
            items = items[ids.index(query.after) + 1 :]
        page = items[: query.limit]
        return {
            "object": "list",
            "data": page,
            "has_more": len(items) > len(page),
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
        }

    async def aclose(self) -> None:
        await self.store.aclose()

    async def _record(self, tenant: str, response_id: str) -> JSON:
        raw = await self.store.get(tenant, response_id)
        if raw is None:
            raise _not_found(response_id)
        record: JSON = orjson.loads(raw)
        return record

    def _check_chain(self, conversation: list[JSON]) -> None:
        limit = self.config.max_chain_items
        if len(conversation) > limit:
            raise InvalidRequest(
                f"The conversation has {len(conversation)} items; at most {limit} are allowed "
                "(responses.max_chain_items). Start a new one without previous_response_id.",
                param="previous_response_id",
            )
        size = len(orjson.dumps(conversation))
        if size > self.config.max_chain_bytes:
            raise InvalidRequest(
                f"The conversation is {size} bytes; at most {self.config.max_chain_bytes} are "
                "allowed (responses.max_chain_bytes). Start a new one without "
                "previous_response_id.",
                param="previous_response_id",
            )


def make_responses(settings: Settings, proxy: Callable[[], Proxy]) -> Responses | None:
    """The use case with its store (Redis when responses.redis_url or keys.redis_url is
    set, else SQLite); None when the Responses API is off. Nothing is opened yet."""
    config = settings.responses
    if not config.enabled:
        return None
    url = config.store_url(settings.keys)
    store = make_response_store(
        url, config.sqlite_path, config.timeout_s,
        max_records=config.max_tenant_records, max_bytes=config.max_tenant_bytes,
    )  # fmt: skip
    return Responses(proxy, store, config)


def _not_found(response_id: str) -> ResponseNotFound:
    return ResponseNotFound(f"Response with id '{response_id[:128]}' not found.")


def _refuse_unsupported(request: ResponseRequest) -> None:
    if request.background:
        raise InvalidRequest("Background responses are not supported.", param="background")
    if request.conversation is not None:
        raise InvalidRequest(
            "Conversation objects are not supported; continue with previous_response_id.",
            param="conversation",
        )
    if request.prompt is not None:
        raise InvalidRequest("Prompt templates are not supported.", param="prompt")
    if request.truncation == "auto":
        raise InvalidRequest(
            "truncation 'auto' is not supported; a conversation longer than the model's "
            "context is a 400.",
            param="truncation",
        )


def _chat_request(body: JSON) -> ChatCompletionRequest:
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise InvalidRequest(
            f"The request cannot be served as a chat completion: {where}: {first['msg']}",
            param=PARAMS.get(where.split(".")[0], where.split(".")[0] or None),
        ) from None


def _rename_param(exc: GatewayError) -> None:
    if exc.param is None:
        return
    head, dot, rest = exc.param.partition(".")
    if head in PARAMS:
        exc.param = PARAMS[head] + dot + rest


def _payload(event: bytes) -> JSON | None:
    """The JSON of one chat SSE event (``data: {...}``); None for ``[DONE]``."""
    data = event.removeprefix(b"data: ").strip()
    if data == b"[DONE]":
        return None
    payload: JSON = orjson.loads(data)
    return payload


async def _events(
    chat: AsyncGenerator[bytes, None],
    writer: EventWriter,
    save: Callable[[JSON], Any] | None,
    request_id: str,
) -> AsyncGenerator[bytes, None]:
    """The chat stream's events as the response's; saved (if asked) before the last."""
    try:
        for event in writer.start():
            yield sse(event)
        async for raw in chat:
            payload = _payload(raw)
            if payload is None:
                break
            error = payload.get("error")
            if isinstance(error, dict):
                message = str(error.get("message") or "The engine failed.")
                for event in writer.fail(error.get("code"), message, error.get("param")):
                    yield sse(event)
                return
            for event in writer.chunk(payload):
                yield sse(event)
        closing, response = writer.finish()
        last = closing.pop()  # response.completed (or .incomplete): once it is stored
        for event in closing:
            yield sse(event)
        if save is not None:
            try:
                await save(response)
            except ResponsesUnavailable as exc:
                log.warning("response of request %s not stored: %s", request_id, exc)
                writer.sequence = last["sequence_number"]  # the last event is not sent
                spec = spec_for(exc)
                for event in writer.fail(spec.code if spec else None, exc.message, None):
                    yield sse(event)
                return
        yield sse(last)
    finally:
        await chat.aclose()
