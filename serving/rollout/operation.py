"""A rollout as asked (``DeployRequest``) and as it goes (``Operation``, the progress that
``GET /weir/admin/models/{m}/deployment`` shows), with its gate (``GateSpec``) and the
failure of a started step (``DeployFailed``). ``serving.rollout.deployer`` runs them."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from serving.rollout import gate

log = logging.getLogger("weir.rollout")


class DeployFailed(Exception):
    """A step of a started rollout failed; what was started has been stopped."""


@dataclass
class GateSpec:
    terms: list[gate.Term]
    window_s: float
    min_requests: int

    def describe(self) -> str:
        return ",".join(str(t) for t in self.terms) + f" over {self.window_s:g}s"


@dataclass
class Operation:
    """One rollout's progress, as ``GET /weir/admin/models/{m}/deployment`` shows it."""

    kind: str  # deploy | canary | rollback
    model: str
    version: str
    phase: str = "starting"
    started: float = field(default_factory=time.time)
    steps: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    decision: dict[str, Any] | None = None
    gate: str | None = None
    _t0: float = field(default_factory=time.monotonic)

    def step(self, phase: str, **facts: Any) -> None:
        self.phase = phase
        self.steps.append({"phase": phase, "at_s": round(time.monotonic() - self._t0, 2), **facts})
        log.info("%s %s@%s: %s %s", self.kind, self.model, self.version, phase, facts or "")

    @property
    def finished(self) -> bool:
        return self.phase in ("done", "failed", "promoted", "rolled_back", "canary")

    def view(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "version": self.version,
            "phase": self.phase,
            "finished": self.finished,
            "started": int(self.started),
            "steps": self.steps,
            "error": self.error,
            "gate": self.gate,
            "decision": self.decision,
        }


@dataclass
class DeployRequest:
    version: str
    canary: float | None = None  # percent of the alias's traffic; None: a full switch
    weights: str | None = None  # for a version not configured: store entry or directory
    urls: list[str] = field(default_factory=list)  # or remote engines
    engine_args: list[str] | None = None
    replicas: int | None = None
    promote_if: str | None = None
    window_s: float = 300.0
    min_requests: int | None = None
