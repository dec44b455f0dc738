"""``/weir/admin/adapters``: serve a stored LoRA adapter now, stop serving it, and what
each engine holds (admin key required). ``weir adapters add|remove`` call these."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from models.adapters.errors import AdapterNotInStore
from serving.adapters.service import AdapterService
from serving.errors import RouteNotFound
from serving.http.deps import configured
from serving.http.routes.openapi_errors import errors

router = APIRouter(prefix="/weir/admin/adapters")


class AdapterBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=48, description="an adapter in the store")


def _service(request: Request) -> AdapterService:
    service: AdapterService | None = getattr(request.app.state, "adapters", None)
    return configured(service, "No model version serves LoRA adapters (set lora = true).")


@router.post("", summary="Load a stored adapter into every engine of its base (no restart)",
             responses=errors(401, 404, 422, 503))  # fmt: skip
async def add(body: AdapterBody, request: Request) -> dict[str, Any]:
    try:
        return await _service(request).add(body.name)
    except AdapterNotInStore as exc:
        raise RouteNotFound(str(exc)) from None


@router.delete("/{name}", summary="Stop serving an adapter; unload it when its requests end",
               responses=errors(401, 404))  # fmt: skip
async def remove(name: str, request: Request) -> dict[str, Any]:
    try:
        return await _service(request).remove(name)
    except AdapterNotInStore as exc:
        raise RouteNotFound(str(exc)) from None


@router.get("", summary="Adapters each base version serves, and which engines hold them")
async def held(request: Request) -> dict[str, Any]:
    service = _service(request)
    return {
        "data": [
            service.view(name, base)
            for base, adapters in sorted(service.wanted.items())
            for name in sorted(adapters)
        ]
    }
