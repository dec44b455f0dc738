"""What the limits are now: the configured and runtime token budgets per model, and what is
reserved (``GET /weir/admin/limits`` and ``weir limits show``)."""

from __future__ import annotations

from pydantic import BaseModel

from serving.limits.limiter import Limiter, Policy


class ModelBudget(BaseModel):
    configured_tpm: int | None  # from the configuration (limits.model_tpm)
    runtime_tpm: int | None  # set at runtime, wins over the configured one


class OutstandingView(BaseModel):
    reservations: int
    tokens: int


class LimitsView(BaseModel):
    store: str
    on_redis_down: Policy
    models: dict[str, ModelBudget]
    outstanding: OutstandingView


async def limits_view(limiter: Limiter, configured: dict[str, int]) -> LimitsView:
    """The budgets of every model named in the configuration or at runtime.

    Raises ``LimitStoreUnavailable`` when the store cannot be read.
    """
    runtime = await limiter.store.model_tpms()
    outstanding = await limiter.store.outstanding()
    models = sorted(set(configured) | set(runtime))
    return LimitsView(
        store=repr(limiter.store),
        on_redis_down=limiter.policy,
        models={
            m: ModelBudget(configured_tpm=configured.get(m), runtime_tpm=runtime.get(m))
            for m in models
        },
        outstanding=OutstandingView(
            reservations=outstanding.reservations, tokens=outstanding.tokens
        ),
    )
