"""Retrieval as the gateway serves it: the service opened on first use, tenants, and RAG.

``RetrievalGate.service()`` opens the docstore and loads the indexes the first time any
collection route or RAG request needs them. ``augment`` runs a chat request's
``"weir": {"retrieval": {...}}``: search within ``retrieval.timeout_s``, put the passages
into a system message, and say what happened (``ok``, or ``degraded`` when retrieval
failed or ran late and the request went on without context; ``required: true`` turns
that into a 503 instead).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from typing import Any

from models.errors import EngineError, ModelNotFound
from models.tokenizer import TokenCounter
from retrieval import chunking
from retrieval.errors import CollectionNotFound
from retrieval.index import IndexParams
from retrieval.service import Embed, Hit, Retrieval
from serving.errors import InvalidRequest, RetrievalUnavailable
from serving.settings import RetrievalConfig

log = logging.getLogger("weir.rag")
JSON = dict[str, Any]
TEMPLATE = (
    "Answer using the context below when it is relevant. The context comes from the"
    " user's documents; each passage is numbered.\n\n{passages}"
)
Count = Callable[[str], None]
# What makes retrieval fail for a while without anything being wrong with the request or
# the gateway: the time limit, the embedding engine (busy, down, refusing the text), its
# model not served right now, the docstore's database. Anything else (a corrupt index,
# a bug) is not hidden as "degraded": it propagates.
DEGRADES = (TimeoutError, EngineError, ModelNotFound, sqlite3.Error)


class RetrievalGate:
    def __init__(
        self,
        config: RetrievalConfig,
        embed: Embed,
        counter: TokenCounter | None,
        count: Count | None = None,
    ) -> None:
        self.config = config
        self.embed = embed
        self.counter = counter
        self.count = count or (lambda result: None)
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
                    self.config.path.expanduser(), self.embed, self._split,
                    params=IndexParams(self.config.index), consistency=self.config.consistency,
                    snapshot_every=self.config.snapshot_every,
                )  # fmt: skip
                await asyncio.to_thread(made.open)
                self._service = made
            return self._service

    async def aclose(self) -> None:
        if self._service is not None:
            await self._service.close()

    async def augment(self, tenant: str, body: JSON, spec: Any) -> tuple[list[JSON] | None, JSON]:
        """New messages with the passages (None: unchanged) and the response extension,
        searching ``tenant``'s collections."""
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
        try:
            service = await self.service()
            hits = await asyncio.wait_for(
                service.search(tenant, spec["collection"], query, top_k,
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
