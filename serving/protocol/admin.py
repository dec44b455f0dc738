"""What Weir's admin routes answer (``/weir/admin/...``): pydantic only, for honest schemas.

The views built from a service's dict forbid extra fields, so a field added there and not
here fails the tests instead of vanishing from the answer.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# ---- keys (/weir/admin/keys)


class KeyView(BaseModel):
    """A key as lists and the admin API show it: everything but its hash and secret."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="the first 12 hex digits of the key's sha256")
    name: str
    models: list[str] = Field(description="the models it may use; empty: every model")
    rpm: int | None = Field(description="requests per minute")
    tpm: int | None = Field(description="tokens per minute")
    tokens_per_day: int | None
    max_concurrency: int | None
    cache: bool = Field(description="may its requests use the response cache")
    cache_namespace: str | None = Field(description="keys sharing one share cached answers")
    budget_day: float | None = Field(None, description="dollars per UTC day")
    budget_month: float | None = Field(None, description="dollars per UTC calendar month")
    budget_total: float | None = Field(None, description="dollars in all")
    tenant: str | None = Field(None, description="fair-queue tenant; null: the key itself")
    weight: float = Field(1.0, description="its tenant's weight in fair queueing")
    priority: Literal["interactive", "batch"] = "interactive"
    created: float = Field(description="unix time")
    revoked: bool


class _Secret(BaseModel):
    key: str = Field(description="the secret, for the Authorization: Bearer header")


class KeyCreated(KeyView, _Secret):  # pydantic orders fields by reversed MRO: key comes first
    """A new key, with its secret: shown in this answer only."""


class KeyList(BaseModel):
    data: list[KeyView]


# ---- limits (/weir/admin/limits; GET answers serving.limits.view.LimitsView)


class ModelLimitSet(BaseModel):
    model: str
    runtime_tpm: int | None = Field(description="null: back to the configured budget")


# ---- rollouts (/weir/admin/models/{model}/...)


class RolloutStep(BaseModel):
    """One step of a rollout: its phase, when, and the step's own facts (extra fields)."""

    model_config = ConfigDict(extra="allow")

    phase: str
    at_s: float = Field(description="seconds since the rollout started")


class GateDecision(BaseModel):
    """A gated canary's verdict, with both versions' numbers over the window."""

    model_config = ConfigDict(extra="forbid")

    promote: bool
    reasons: list[str]
    canary: dict[str, float | int | None]
    stable: dict[str, float | int | None]


class OperationView(BaseModel):
    """The last rollout of a model, finished or not."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["deploy", "canary", "rollback"]
    version: str
    phase: str
    finished: bool
    started: int = Field(description="unix time")
    steps: list[RolloutStep]
    error: str | None
    gate: str | None = Field(description="a canary's promotion rule")
    decision: GateDecision | None


class ReplicaState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    replica: str
    healthy: bool
    outstanding: int


class DeploymentStatus(BaseModel):
    """A model's versions, its traffic split, its replicas and its last rollout."""

    model_config = ConfigDict(extra="forbid")

    model: str
    current: str
    split: dict[str, float] = Field(description="version -> share of the alias's traffic")
    running: list[str]
    versions: list[str]
    previous: str | None = Field(description="what a rollback goes back to")
    replicas: list[ReplicaState]
    in_flight: dict[str, int] = Field(description="running version -> requests in flight")
    operation: OperationView | None
