"""``[billing]`` in weir.toml: prices per model version (or adapter) and team budgets.

A price is per million prompt, completion and cached-hit tokens, or derived from a cost
per GPU-second and the version's measured throughput (tokens per GPU-second). Each price
takes effect at its ``since`` time (default: always); a later entry for the same model and
version replaces it from its own ``since``, so a change is stated ahead and old usage
keeps its old price (the ledger stores each request's cost, and the prices table every
price with its time). Budgets are dollars per UTC day, per UTC calendar month, or a
fixed total; a key's own budgets are on the key (``weir keys create --budget-day``).
"""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict, Field, model_validator


class PriceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str  # the public name: smollm2, or an adapter's smollm2:pirate
    version: str = "*"  # a version (an adapter's: 135m-instruct:pirate); *: every version
    since: datetime = datetime(1970, 1, 1, tzinfo=UTC)  # when this price takes effect
    prompt_per_m: float | None = Field(None, ge=0)  # dollars per million prompt tokens
    completion_per_m: float | None = Field(None, ge=0)
    cached_per_m: float | None = Field(None, ge=0)  # prompt tokens served from prefix cache
    gpu_second: float | None = Field(None, ge=0)  # dollars per GPU-second, instead
    prompt_tokens_per_gpu_s: float | None = Field(None, gt=0)  # measured throughput
    completion_tokens_per_gpu_s: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_way(self) -> PriceConfig:
        per_token = self.prompt_per_m is not None or self.completion_per_m is not None
        per_gpu = self.gpu_second is not None
        if per_token == per_gpu:
            raise ValueError(
                f"price for {self.model}@{self.version}: give prompt_per_m/completion_per_m,"
                " or gpu_second with prompt_/completion_tokens_per_gpu_s (one of the two)"
            )
        if per_gpu and (
            self.prompt_tokens_per_gpu_s is None or self.completion_tokens_per_gpu_s is None
        ):
            raise ValueError(
                f"price for {self.model}@{self.version}: gpu_second needs"
                " prompt_tokens_per_gpu_s and completion_tokens_per_gpu_s"
            )
        if self.since.tzinfo is None:
            raise ValueError(f"price for {self.model}@{self.version}: since needs a time zone")
        return self

    def per_million(self) -> tuple[float, float, float]:
        """Dollars per million prompt, completion and cached tokens."""
        if self.gpu_second is not None:
            prompt = self.gpu_second / (self.prompt_tokens_per_gpu_s or 1.0) * 1e6
            completion = self.gpu_second / (self.completion_tokens_per_gpu_s or 1.0) * 1e6
            return prompt, completion, prompt if self.cached_per_m is None else self.cached_per_m
        prompt = self.prompt_per_m or 0.0
        completion = self.completion_per_m or 0.0
        cached = prompt if self.cached_per_m is None else self.cached_per_m
        return prompt, completion, cached


class BudgetConfig(BaseModel):
    """Dollars a team may spend: per UTC day, per UTC calendar month, in all."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    day: float | None = Field(None, gt=0)
    month: float | None = Field(None, gt=0)
    total: float | None = Field(None, gt=0)


class BillingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prices: list[PriceConfig] = []
    teams: dict[str, BudgetConfig] = {}  # a key's team is its tenant (weir keys --tenant)
