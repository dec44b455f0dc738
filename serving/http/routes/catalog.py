"""``/v1/models``: every public name (the alias) and every pinned ``name@version`` that
the caller's key may use (a key limited to some models sees only those)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel

from serving.http.deps import RegistryDep
from serving.http.front import caller_of

router = APIRouter(prefix="/v1")


class AliasTraffic(BaseModel):
    split: dict[str, float]  # version -> share of the alias's traffic
    current: str  # the stable version


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "weir"
    weir: AliasTraffic | None = None  # on an alias only; pinned cards leave it out


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


@router.get("/models", summary="List the served models", response_model_exclude_none=True)
async def list_models(request: Request, registry: RegistryDep) -> ModelList:
    created: int = request.app.state.started
    caller = caller_of(request.scope)
    cards: list[ModelCard] = []
    for model in registry.models:
        if not caller.allows(model.name):
            continue
        split = AliasTraffic(split=model.shares(), current=model.current)
        cards.append(ModelCard(id=model.name, created=created, weir=split))
        cards += [
            ModelCard(id=f"{model.name}@{v}", created=created) for v in registry.running(model.name)
        ]
    return ModelList(data=cards)  # weir is left out of pinned cards (exclude_none below)
