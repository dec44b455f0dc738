"""``/v1/collections``: a tenant's collections, their documents, and search.

Every route runs inside ``RetrievalGate.request(caller)``: one request against the key's
limits, and the key's model list and token limits for what it embeds (``serving.core.rag``).
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Annotated, Any

from fastapi import APIRouter, Request
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from retrieval.service import Document, Retrieval
from serving.core.rag import RetrievalGate
from serving.errors import InvalidRequest
from serving.http.deps import configured
from serving.http.front import caller_of
from serving.sql_text import SURROGATE

router = APIRouter(prefix="/v1/collections")
NUL = "\x00"  # the docstore's ids and texts are PostgreSQL text, which takes none


def _without_nul(text: str) -> str:
    if NUL in text:
        raise ValueError("cannot hold NUL")
    return text


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("has no text to embed (it is empty or only whitespace)")
    return text


def _utf8(value: Any) -> bool:
    """Whether a JSON value (metadata) has no lone surrogate in any key or string."""
    if isinstance(value, str):
        return SURROGATE.search(value) is None  # a search could not answer it
    if isinstance(value, dict):
        return all(_utf8(k) and _utf8(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_utf8(v) for v in value)
    return True


def _storable_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    if not _utf8(metadata):
        raise ValueError("keys and strings cannot hold a lone surrogate")
    return metadata


StoredText = Annotated[str, AfterValidator(_without_nul)]
# what is embedded (a document's text, a query): never blank, which the engine cannot embed
EmbeddedText = Annotated[StoredText, AfterValidator(_not_blank)]
Metadata = Annotated[dict[str, Any], AfterValidator(_storable_metadata)]


class CollectionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64)
    shards: int | None = Field(None, ge=1, le=256)  # default: retrieval.shards


class DocumentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: StoredText | None = Field(None, min_length=1, max_length=256)
    text: EmbeddedText = Field(min_length=1)
    metadata: Metadata = {}


class DocumentsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    documents: list[DocumentIn] = Field(min_length=1)


class DocumentUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: EmbeddedText = Field(min_length=1)
    metadata: Metadata = {}


class SearchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: Annotated[str, AfterValidator(_not_blank)] = Field(min_length=1)
    top_k: int = Field(4, ge=1)
    min_score: float | None = Field(None, ge=-1, le=1)
    filter: dict[str, Any] | None = None


def tenant_of(request: Request) -> str:
    return caller_of(request.scope).tenant


def _for(
    gate: RetrievalGate, request: Request, *, embeds: bool = True
) -> AbstractAsyncContextManager[Retrieval]:
    """The service for this request's caller, counted and checked (an async context)."""
    return gate.request(caller_of(request.scope), embeds=embeds)


def _gate(request: Request) -> RetrievalGate:
    gate: RetrievalGate | None = getattr(request.app.state, "retrieval", None)
    return configured(gate, "Retrieval is off (retrieval.enabled = false).")


def _check(gate: RetrievalGate, documents: list[DocumentIn]) -> None:
    config = gate.config
    if len(documents) > config.max_documents:
        raise InvalidRequest(
            f"{len(documents)} documents; at most {config.max_documents} a request.",
            param="documents",
        )
    for n, document in enumerate(documents):
        if len(document.text.encode()) > config.max_document_bytes:
            raise InvalidRequest(
                f"document {n} is over {config.max_document_bytes} bytes.", param="documents"
            )


@router.post("", status_code=201, summary="Create a collection")
async def create(spec: CollectionCreate, request: Request) -> dict[str, Any]:
    async with _for(_gate(request), request) as service:
        shards = spec.shards or _gate(request).config.shards
        await service.create_collection(tenant_of(request), spec.name, shards)
    return {"name": spec.name, "object": "collection", "shards": shards}


@router.get("", summary="This tenant's collections")
async def list_all(request: Request) -> dict[str, Any]:
    async with _for(_gate(request), request, embeds=False) as service:
        return {"object": "list", "data": service.list_collections(tenant_of(request))}


@router.delete("/{name}", summary="Delete a collection and its documents")
async def delete(name: str, request: Request) -> dict[str, Any]:
    async with _for(_gate(request), request, embeds=False) as service:
        service.delete_collection(tenant_of(request), name)
    return {"name": name, "deleted": True}


@router.post("/{name}/documents", summary="Add (or replace, by id) documents")
async def add(name: str, spec: DocumentsIn, request: Request) -> dict[str, Any]:
    gate = _gate(request)
    _check(gate, spec.documents)
    docs = [Document(d.text, d.id, d.metadata) for d in spec.documents]
    async with _for(gate, request) as service:
        ids = await service.upsert(tenant_of(request), name, docs)
    return {"object": "list", "ids": ids}


@router.put("/{name}/documents/{doc_id}", summary="Replace one document")
async def update(name: str, doc_id: str, spec: DocumentUpdate, request: Request) -> dict[str, Any]:
    gate = _gate(request)
    try:  # the path's id, checked as a body's is
        document = DocumentIn(id=doc_id, text=spec.text, metadata=spec.metadata)
    except ValidationError as exc:
        raise InvalidRequest(f"doc_id: {exc.errors()[0]['msg']}", param="doc_id") from exc
    _check(gate, [document])
    async with _for(gate, request) as service:
        await service.upsert(tenant_of(request), name, [Document(spec.text, doc_id, spec.metadata)])
    return {"id": doc_id}


@router.delete("/{name}/documents/{doc_id}", summary="Delete one document")
async def remove(name: str, doc_id: str, request: Request) -> dict[str, Any]:
    async with _for(_gate(request), request, embeds=False) as service:
        await service.delete_document(tenant_of(request), name, doc_id)
    return {"id": doc_id, "deleted": True}


@router.post("/{name}/search", summary="Search a collection")
async def search(name: str, spec: SearchIn, request: Request) -> dict[str, Any]:
    gate = _gate(request)
    if spec.top_k > gate.config.max_top_k:
        raise InvalidRequest(f"top_k is at most {gate.config.max_top_k}.", param="top_k")
    async with _for(gate, request) as service:
        hits = await service.search(
            tenant_of(request), name, spec.query, spec.top_k, spec.min_score, spec.filter
        )
    return {
        "object": "list",
        "data": [
            {"id": h.document_id, "chunk_id": h.id, "score": h.score, "text": h.text,
             "metadata": h.metadata}
            for h in hits
        ],
    }  # fmt: skip
