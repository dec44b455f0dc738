"""``/v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from serving.core.proxy import CHAT, COMPLETIONS, EMBEDDINGS
from serving.http.deps import ProxyDep
from serving.http.routes.openapi_errors import GENERATION_ERRORS
from serving.protocol.requests import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

router = APIRouter(prefix="/v1", responses=GENERATION_ERRORS)


@router.post("/chat/completions", summary="Create a chat completion (JSON or SSE)")
async def chat_completions(body: ChatCompletionRequest, proxy: ProxyDep, http: Request) -> Response:
    return await proxy.handle(CHAT, body, http)


@router.post("/completions", summary="Create a text completion (JSON or SSE)")
async def completions(body: CompletionRequest, proxy: ProxyDep, http: Request) -> Response:
    return await proxy.handle(COMPLETIONS, body, http)


@router.post("/embeddings", summary="Create embeddings")
async def embeddings(body: EmbeddingRequest, proxy: ProxyDep, http: Request) -> Response:
    return await proxy.handle(EMBEDDINGS, body, http)
