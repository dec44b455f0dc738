"""``/weir/admin/keys``: create, list and revoke API keys (admin key required)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from serving.errors import InvalidRequest, RouteNotFound
from serving.http.deps import configured
from serving.keys.issue import KeyCreate, create_key
from serving.keys.store import KeyStore, UnknownKey
from serving.protocol.admin import KeyCreated, KeyList, KeyView

router = APIRouter(prefix="/weir/admin")


def _store(request: Request) -> KeyStore:
    store: KeyStore | None = request.app.state.key_store
    return configured(store, "No key store is configured.")


@router.post("/keys", summary="Create a key; its secret is shown only in this answer")
async def create(spec: KeyCreate, request: Request) -> KeyCreated:
    secret, record = await create_key(_store(request), spec)
    return KeyCreated(key=secret, **record.public())


@router.get("/keys", summary="List keys (never their secrets)")
async def list_keys(request: Request) -> KeyList:
    return KeyList(data=[KeyView(**r.public()) for r in await _store(request).list()])


@router.delete("/keys/{key_id}", summary="Revoke a key")
async def revoke(key_id: str, request: Request) -> KeyView:
    if len(key_id) < 6:
        raise InvalidRequest("Give at least 6 characters of the key id.", param="key_id")
    try:
        return KeyView(**(await _store(request).revoke(key_id)).public())
    except UnknownKey:
        raise RouteNotFound(f"No key with id {key_id}.") from None
