"""``/weir/admin/limits``: the per-model token budgets at runtime, and what is reserved now."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from serving.errors import LimitsUnavailable
from serving.http.deps import configured
from serving.limits.limiter import Limiter
from serving.limits.store import LimitStoreUnavailable
from serving.limits.view import LimitsView, limits_view
from serving.protocol.admin import ModelLimitSet

router = APIRouter(prefix="/weir/admin/limits")


class ModelLimit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tpm: int | None = Field(ge=0, description="tokens per minute; null: back to the configured")


def _limiter(request: Request) -> Limiter:
    limiter: Limiter | None = request.app.state.limiter
    return configured(limiter, "Limits are off (limits.enabled = false).")


@router.get("", summary="Model token budgets and outstanding reservations")
async def show(request: Request) -> LimitsView:
    configured = dict(request.app.state.settings.limits.model_tpm)
    try:
        return await limits_view(_limiter(request), configured)
    except LimitStoreUnavailable as exc:
        raise LimitsUnavailable(str(exc), retry_after_s=1) from None


@router.put("/models/{model}", summary="Set (or clear) a model's tokens-per-minute at runtime")
async def set_model(model: str, spec: ModelLimit, request: Request) -> ModelLimitSet:
    limiter = _limiter(request)
    try:
        await limiter.store.set_model_tpm(model, spec.tpm)
    except LimitStoreUnavailable as exc:
        raise LimitsUnavailable(str(exc), retry_after_s=1) from None
    return ModelLimitSet(model=model, runtime_tpm=spec.tpm)
