"""``/weir/engines``: the replicas (URLs, health, restarts, breakers, load) and bulkheads.

Operators use it to find the engines' own ``/metrics`` (the ``vllm:*`` series) and
benchmarks use it to reach an engine directly.
"""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from serving.http.deps import ProxyDep

router = APIRouter(prefix="/weir")


class ReplicaView(BaseModel):
    replica: str
    model: str
    version: str
    base_url: str | None
    healthy: bool
    local: bool
    pid: int | None  # the engine's guard process (local engines)
    restarts: int
    breaker: str  # closed | open | half_open
    breaker_trips: int
    outstanding: int
    requests: int


class BulkheadView(BaseModel):
    version: str
    in_flight: int
    queued: int
    max_in_flight: int
    max_queue: int
    rejected: int


class EngineList(BaseModel):
    data: list[ReplicaView]
    bulkheads: list[BulkheadView]


@router.get("/engines", summary="Engine replicas, their health and load")
async def list_engines(proxy: ProxyDep) -> EngineList:
    dispatcher = proxy.dispatcher
    bulkheads = [
        BulkheadView(
            version=str(key), in_flight=b.in_flight, queued=b.queued,
            max_in_flight=b.max_in_flight, max_queue=b.max_queue, rejected=b.rejected,
        )
        for key, b in dispatcher.bulkheads().items()
    ]  # fmt: skip
    views = []
    for r in dispatcher.fleet.replicas:
        load = dispatcher.load_of(r)
        views.append(
            ReplicaView(
                replica=str(r.key),
                model=r.key.model,
                version=r.key.version,
                base_url=getattr(r.engine, "base_url", None),
                healthy=r.healthy,
                local=r.process is not None,
                pid=r.process.pid if r.process else None,
                restarts=r.process.restarts if r.process else 0,
                breaker=load.breaker.state,
                breaker_trips=load.breaker.trips,
                outstanding=load.outstanding,
                requests=load.requests,
            )
        )
    return EngineList(data=views, bulkheads=bulkheads)
