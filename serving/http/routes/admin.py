"""``/weir/admin/keys``: create, list and revoke API keys (admin key required)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from serving.errors import InvalidRequest, RouteNotFound
from serving.keys.records import KeyRecord, hash_secret, new_secret
from serving.keys.store import KeyStore, UnknownKey

router = APIRouter(prefix="/weir/admin")


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    models: list[str] = []
    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    tokens_per_day: int | None = Field(None, ge=1)
    max_concurrency: int | None = Field(None, ge=1)
    cache: bool = True
    cache_namespace: str | None = Field(None, min_length=1, max_length=64)


def _store(request: Request) -> KeyStore:
    store: KeyStore | None = request.app.state.key_store
    if store is None:
        raise RouteNotFound("No key store is configured.")
    return store


async def create_key(store: KeyStore, spec: KeyCreate) -> tuple[str, KeyRecord]:
    secret = new_secret()
    record = KeyRecord(
        hash=hash_secret(secret), **{**spec.model_dump(), "models": tuple(spec.models)}
    )
    await store.add(record)
    return secret, record


@router.post("/keys", summary="Create a key; its secret is shown only in this answer")
async def create(spec: KeyCreate, request: Request) -> dict[str, Any]:
    secret, record = await create_key(_store(request), spec)
    return {"key": secret, **record.public()}


@router.get("/keys", summary="List keys (never their secrets)")
async def list_keys(request: Request) -> dict[str, Any]:
    return {"data": [r.public() for r in await _store(request).list()]}


@router.delete("/keys/{key_id}", summary="Revoke a key")
async def revoke(key_id: str, request: Request) -> dict[str, Any]:
    if len(key_id) < 6:
        raise InvalidRequest("Give at least 6 characters of the key id.", param="key_id")
    try:
        return (await _store(request).revoke(key_id)).public()
    except UnknownKey:
        raise RouteNotFound(f"No key with id {key_id}.") from None
