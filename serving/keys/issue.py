"""Issuing a key: what a new key may be given, and making it (the admin API and ``weir keys``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serving.keys.records import KeyRecord, hash_secret, new_secret
from serving.keys.store import KeyStore
from serving.sql_text import SURROGATE


class KeyCreate(BaseModel):
    """A new key's name, models and limits (``POST /weir/admin/keys``, ``weir keys create``)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    models: list[str] = []
    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    tokens_per_day: int | None = Field(None, ge=1)
    max_concurrency: int | None = Field(None, ge=1)
    cache: bool = True
    cache_namespace: str | None = Field(None, min_length=1, max_length=64)
    budget_day: float | None = Field(None, gt=0)  # dollars per UTC day
    budget_month: float | None = Field(None, gt=0)  # dollars per UTC calendar month
    budget_total: float | None = Field(None, gt=0)  # dollars in all
    tenant: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]{1,64}$")  # fair-queue tenant
    weight: float = Field(1.0, gt=0, le=1000)  # its share against other tenants'
    priority: Literal["interactive", "batch"] = "interactive"

    @field_validator("models")
    @classmethod
    def _utf8(cls, models: list[str]) -> list[str]:
        """pydantic checks no item of a list of strings; the other strings, checked for
        their length, are refused with a lone surrogate already."""
        if any(SURROGATE.search(model) for model in models):  # a key holding one cannot be shown
            raise ValueError("a model name cannot hold a lone surrogate")
        return models


async def create_key(store: KeyStore, spec: KeyCreate) -> tuple[str, KeyRecord]:
    """A new secret and its record, stored; the secret is not kept anywhere else."""
    secret = new_secret()
    record = KeyRecord(
        hash=hash_secret(secret), **{**spec.model_dump(), "models": tuple(spec.models)}
    )
    await store.add(record)
    return secret, record
