"""``/weir/engines``: our namespaced view of the replicas (URLs, health, restarts).

Operators use it to find the engines' own ``/metrics`` (the ``vllm:*`` series) and
benchmarks use it to reach an engine directly.
"""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from serving.deps import FleetDep

router = APIRouter(prefix="/weir")


class ReplicaView(BaseModel):
    replica: str
    model: str
    version: str
    base_url: str | None
    healthy: bool
    local: bool
    restarts: int


class EngineList(BaseModel):
    data: list[ReplicaView]


@router.get("/engines", summary="Engine replicas and their health")
async def list_engines(fleet: FleetDep) -> EngineList:
    views = [
        ReplicaView(
            replica=str(r.key),
            model=r.key.model,
            version=r.key.version,
            base_url=getattr(r.engine, "base_url", None),
            healthy=r.healthy,
            local=r.process is not None,
            restarts=r.process.restarts if r.process else 0,
        )
        for r in fleet.replicas
    ]
    return EngineList(data=views)
