"""``/v1/models``: every public name (the alias) and every pinned ``name@version`` that
the caller's key may use (a key limited to some models sees only those).
``/v1/models/{model}``: one of those cards; any other id, and any the key may not use, is
the same 404 ``model_not_found`` (nothing says whether a model the key can't use exists)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel

from models.errors import ModelNotFound
from models.registry import Registry, parse_name, public_name, split_name
from models.types import VersionKey
from serving.core.call import Caller
from serving.http.deps import RegistryDep
from serving.http.front import caller_of
from serving.http.routes.openapi_errors import errors

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
    parent: str | None = None  # a LoRA adapter's base version (as vLLM's cards say)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


@router.get("/models", summary="List the served models", response_model_exclude_none=True)
async def list_models(request: Request, registry: RegistryDep) -> ModelList:
    created: int = request.app.state.started
    caller = caller_of(request.scope)
    cards: list[ModelCard] = []
    adapters = registry.adapters()
    for model in registry.models:
        cards += _adapter_cards(model.name, registry, adapters, caller, created)
        if not caller.allows(model.name):
            continue
        split = AliasTraffic(split=model.shares(), current=model.current)
        cards.append(ModelCard(id=model.name, created=created, weir=split))
        cards += [
            ModelCard(id=f"{model.name}@{v}", created=created) for v in registry.running(model.name)
        ]
    return ModelList(data=cards)  # weir is left out of pinned cards (exclude_none below)


def _adapter_cards(
    model: str,
    registry: Registry,
    adapters: dict[VersionKey, list[str]],
    caller: Caller,
    created: int,
) -> list[ModelCard]:
    """``MODEL:ADAPTER`` and its pins ``MODEL@VERSION:ADAPTER``, each with its base."""
    cards: list[ModelCard] = []
    for version in registry.running(model):
        for adapter in adapters.get(VersionKey(model, version), []):
            if not caller.allows(f"{model}:{adapter}"):
                continue
            parent = f"{model}@{version}"
            if all(c.id != f"{model}:{adapter}" for c in cards):
                cards.append(ModelCard(id=f"{model}:{adapter}", created=created, parent=parent))
            cards.append(ModelCard(id=f"{parent}:{adapter}", created=created, parent=parent))
    return cards


def card(registry: Registry, caller: Caller, name: str, created: int) -> ModelCard:
    """The card ``/v1/models`` lists under ``name``; ``ModelNotFound`` when it lists none."""
    if parse_name(name)[2]:  # an adapter: listed while a running version serves it
        if not caller.allows(public_name(name)):
            raise ModelNotFound(name)
        served = registry.resolve(name)
        return ModelCard(id=name, created=created, parent=str(served.engine))
    base, version = split_name(name)
    model = registry.model(base)
    if model is None or not caller.allows(base):
        raise ModelNotFound(name)
    if name == base:
        return ModelCard(id=base, created=created, weir=AliasTraffic(
            split=model.shares(), current=model.current))  # fmt: skip
    if version not in registry.running(base):
        raise ModelNotFound(name)  # not configured, or stopped: /v1/models lists neither
    return ModelCard(id=name, created=created)


@router.get(
    "/models/{model:path}",
    summary="Retrieve a served model (an alias or a name@version pin)",
    response_model_exclude_none=True,
    responses=errors(401, 404),
)
async def retrieve_model(model: str, request: Request, registry: RegistryDep) -> ModelCard:
    return card(registry, caller_of(request.scope), model, request.app.state.started)
