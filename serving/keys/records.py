"""The key record and how secrets become ids and hashes."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

PREFIX = "sk-weir-"
ID_LENGTH = 12


def new_secret() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def same_hash(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


@dataclass(frozen=True, kw_only=True)
class KeyRecord:
    hash: str
    name: str
    models: tuple[str, ...] = ()  # empty: every model
    rpm: int | None = None  # requests per minute
    tpm: int | None = None  # tokens per minute
    tokens_per_day: int | None = None
    max_concurrency: int | None = None
    cache: bool = True  # may this key's requests use the response cache
    cache_namespace: str | None = None  # keys sharing a namespace share cached answers
    # money budgets in dollars (serving/billing): per UTC day, per UTC month, in all
    budget_day: float | None = None
    budget_month: float | None = None
    budget_total: float | None = None
    # fair queueing (serving/routing/bulkhead.py): keys with the same tenant share one
    # share of a version's slots (none: the key is its own tenant), weighted; a batch key's
    # requests wait for the room interactive traffic leaves
    tenant: str | None = None
    weight: float = 1.0
    priority: Literal["interactive", "batch"] = "interactive"
    created: float = field(default_factory=time.time)
    revoked: bool = False

    @property
    def id(self) -> str:
        return self.hash[:ID_LENGTH]

    @property
    def cache_scope(self) -> str:
        return f"ns:{self.cache_namespace}" if self.cache_namespace else f"key:{self.id}"

    def allows(self, model: str) -> bool:
        return not self.models or model in self.models

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["models"] = list(self.models)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KeyRecord:
        known = {f for f in cls.__dataclass_fields__}
        fields = {k: v for k, v in data.items() if k in known}
        return cls(**{**fields, "models": tuple(data.get("models") or ())})

    def public(self) -> dict[str, Any]:
        """What lists and the admin API show: everything but the full hash."""
        data = self.to_dict()
        data.pop("hash")
        return {"id": self.id, **data}
