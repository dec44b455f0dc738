"""Retrieval as the gateway serves it: the service opened on first use, tenants, and RAG.

``RetrievalGate.service()`` opens the docstore and loads the indexes the first time any
collection route or RAG request needs them. ``augment`` runs a chat request's
``"weir": {"retrieval": {...}}``: search within ``retrieval.timeout_s``, put the passages
into a system message, and say what happened (``ok``, or ``degraded`` when retrieval
failed or ran late and the request went on without context; ``required: true`` turns
that into a 503 instead).

Whoever asks pays and is bounded: every collections request and every RAG search runs
for a ``Caller``. ``request(caller)`` (a collections route) refuses a key whose model
list leaves out the embedding model (403) and takes one request from the key's ``rpm``
and ``max_concurrency``; every embedding made on the caller's behalf (a document's
chunks, a query, RAG's query) reserves its tokens from the key's ``tpm`` and
``tokens_per_day`` and the embedding model's ``model_tpm``, and is looked up in the
embedding cache under the caller's cache scope, never another tenant's. RAG takes no
request of its own: the chat request it is part of is the one counted.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any

from models.errors import EngineError, ModelNotFound
from models.tokenizer import TokenCounter
from retrieval import chunking
from retrieval.errors import CollectionNotFound, StoreUnavailable
from retrieval.index import IndexParams
from retrieval.scatter import Scatter
from retrieval.service import Hit, Retrieval
from serving.core.call import Caller
from serving.errors import InvalidRequest, PermissionDenied, RetrievalUnavailable
from serving.limits.limiter import UNLIMITED_TICKET, Limiter, Ticket, Unlimited
from serving.limits.plan import Kind, plan
from serving.settings import RetrievalConfig

log = logging.getLogger("weir.rag")
JSON = dict[str, Any]
TEMPLATE = (
    "Answer using the context below when it is relevant. The context comes from the"
    " user's documents; each passage is numbered.\n\n{passages}"
)
Count = Callable[[str], None]
# texts and the cache scope of the caller they are embedded for -> their vectors
ScopedEmbed = Callable[[list[str], str], Awaitable[list[list[float]]]]
REQUEST_KINDS: frozenset[Kind] = frozenset({"requests", "concurrency"})  # one per request
TOKEN_KINDS: frozenset[Kind] = frozenset({"tokens", "model_tokens"})  # each embedding
# Who the retrieval service is working for right now. ``Retrieval`` calls its embed
# function with texts only; the gate sets this around each call it makes into the service
# (a task started inside, like ``wait_for``'s, inherits it), so the embedding is charged
# to, and cached for, that caller.
_working_for: ContextVar[Caller | None] = ContextVar("weir_retrieval_caller", default=None)
# What makes retrieval fail for a while without anything being wrong with the request or
# the gateway: the time limit, the embedding engine (busy, down, refusing the text), its
# model not served right now, the docstore's database (SQLite or PostgreSQL). Anything
# else (a corrupt index, a bug) is not hidden as "degraded": it propagates.
DEGRADES = (TimeoutError, EngineError, ModelNotFound, sqlite3.Error, StoreUnavailable)


class RetrievalGate:
    def __init__(
        self,
        config: RetrievalConfig,
        embed: ScopedEmbed,
        counter: TokenCounter | None,
        count: Count | None = None,
        *,
        limiter: Limiter | None = None,
        model_tpm: Mapping[str, int] | None = None,
    ) -> None:
        self.config = config
        self.embed = embed
        self.counter = counter
        self.count = count or (lambda result: None)
        self.limiter = limiter
        self.model_tpm = model_tpm or {}
        self._service: Retrieval | None = None
        self._opening = asyncio.Lock()

    def __repr__(self) -> str:
        return f"RetrievalGate(path={str(self.config.path)!r})"

    def _split(self, text: str) -> list[str]:
        size, overlap = self.config.chunk_tokens, self.config.chunk_overlap
        if self.counter is not None:
            return chunking.split(text, self.counter.tokenizer, size, overlap)
        step = (size - overlap) * 4  # no tokenizer: about four characters a token
        return [text[i : i + size * 4] for i in range(0, max(len(text), 1), step)]

    async def service(self) -> Retrieval:
        async with self._opening:
            if self._service is None:
                made = Retrieval(
                    self.config.path.expanduser(), self._embed, self._split,
                    params=IndexParams(self.config.index), consistency=self.config.consistency,
                    snapshot_every=self.config.snapshot_every, database=self._database_url(),
                    follow_interval_s=self.config.follow_interval_s,
                    batch_window_s=self.config.batch_window_ms / 1000,
                    max_batch=self.config.max_batch, scatter=self._scatter(),
                )  # fmt: skip
                await asyncio.to_thread(made.open)
                self._service = made
            return self._service

    def _scatter(self) -> Scatter | None:
        if not self.config.index_workers:
            return None
        token = self.config.worker_token
        return Scatter(
            self.config.worker_timeout_s, self.config.takeover_s,
            None if token is None else token.get_secret_value(),
        )  # fmt: skip

    def _database_url(self) -> str | None:
        url = self.config.database_url
        return None if url is None else url.get_secret_value()

    async def aclose(self) -> None:
        if self._service is not None:
            await self._service.close()

    @asynccontextmanager
    async def request(self, caller: Caller, *, embeds: bool = True) -> AsyncIterator[Retrieval]:
        """The service, for one collections request by ``caller``: refused (403) when it
        ``embeds`` and the key may not use the embedding model, counted as one request
        against the key's limits (429 past them); its embeddings charge their tokens."""
        if embeds:
            self._check_model(caller)
        ticket = await self._admit(caller, REQUEST_KINDS, 0)
        working = _working_for.set(caller)
        try:
            yield await self.service()
        finally:
            _working_for.reset(working)
            ticket.finish(0)  # a request holds no tokens: this frees its concurrency slot

    def _check_model(self, caller: Caller) -> None:
        if not caller.allows(self.config.embedding_model):
            raise PermissionDenied(
                "This API key may not use the retrieval embedding model.", param=None
            )

    async def _admit(
        self, caller: Caller, kinds: frozenset[Kind], tokens: int
    ) -> Ticket | Unlimited:
        if self.limiter is None:
            return UNLIMITED_TICKET
        model = self.config.embedding_model
        checks = plan(caller.key, model, tokens, self.model_tpm.get(model))
        wanted = [c for c in checks if c.kind in kinds]
        if not wanted:
            return UNLIMITED_TICKET
        return await self.limiter.admit(model, wanted)

    def _tokens(self, texts: list[str]) -> int:
        if self.counter is not None:
            return sum(self.counter.count_texts(texts))
        return sum(math.ceil(len(text) / 4) for text in texts)  # as ``_split`` reckons

    async def _embed(self, texts: list[str]) -> list[list[float]]:
        """The service's embed function: for whoever the gate is working for, within
        their model list and token limits, cached under their scope."""
        caller = _working_for.get()
        if caller is None:
            raise RuntimeError("retrieval embedded outside a caller's request")
        self._check_model(caller)
        tokens = self._tokens(texts)
        ticket = await self._admit(caller, TOKEN_KINDS, tokens)
        try:
            vectors = await self.embed(texts, caller.cache_scope)
        except BaseException:
            ticket.finish(None)  # nothing embedded: the reservation goes back
            raise
        ticket.finish(tokens)
        return vectors

    async def augment(
        self, caller: Caller, body: JSON, spec: Any
    ) -> tuple[list[JSON] | None, JSON]:
        """New messages with the passages (None: unchanged) and the response extension,
        searching ``caller``'s collections (its chat request is the one counted; the
        query's embedding charges its tokens)."""
        if not isinstance(spec, dict) or not isinstance(spec.get("collection"), str):
            raise InvalidRequest(
                "weir.retrieval needs a collection name.", param="weir.retrieval.collection"
            )
        top_k = spec.get("top_k", 4)
        if not isinstance(top_k, int) or not 1 <= top_k <= self.config.max_top_k:
            raise InvalidRequest(
                f"weir.retrieval.top_k must be 1..{self.config.max_top_k}.",
                param="weir.retrieval.top_k",
            )
        messages = body.get("messages") or []
        query = _last_user_text(messages)
        if not query.strip():  # nothing to embed: the engine cannot, and it would match nothing
            raise InvalidRequest(
                "weir.retrieval searches with the last user message's text, and it has none.",
                param="messages",
            )
        self._check_model(caller)
        working = _working_for.set(caller)
        try:
            service = await self.service()
            hits = await asyncio.wait_for(
                service.search(caller.tenant, spec["collection"], query, top_k,
                               spec.get("min_score")),
                self.config.timeout_s,
            )  # fmt: skip
        except CollectionNotFound:
            raise  # the client named a collection it does not have: a 404, not a degradation
        except DEGRADES as exc:
            if spec.get("required"):
                self.count("refused")
                raise RetrievalUnavailable(f"Retrieval was required and failed: {exc}") from exc
            log.warning("retrieval degraded for %s: %s", spec["collection"], type(exc).__name__)
            self.count("degraded")
            return None, {"status": "degraded", "citations": []}
        finally:
            _working_for.reset(working)
        self.count("ok")
        extension = {
            "status": "ok",
            "citations": [{"document_id": h.document_id, "chunk_id": h.id,
                           "score": round(h.score, 4)} for h in hits],
        }  # fmt: skip
        if not hits:
            return None, extension
        return [{"role": "system", "content": _context(hits)}, *messages], extension


def _context(hits: list[Hit]) -> str:
    passages = "\n\n".join(f"[{n}] {hit.text}" for n, hit in enumerate(hits, start=1))
    return TEMPLATE.format(passages=passages)


def _last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    raise InvalidRequest("weir.retrieval needs a user message to search with.", param="messages")
