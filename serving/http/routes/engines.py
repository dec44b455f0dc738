"""``/weir/engines``: the replicas (URLs, health, restarts, breakers, load) and bulkheads.

Operators use it to find the engines' own ``/metrics`` (the ``vllm:*`` series) and
benchmarks use it to reach an engine directly.

Least privilege: the full view (engine URLs, guard pids, local or not) goes to the admin
key (``keys.admin_key`` as the bearer) and to a gateway that checks no keys at all. Any
other key (a tenant's, a static key) sees only the replicas and bulkheads of the models it
may use, without URLs, pids or where they run.
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel

from serving.http.deps import ProxyDep
from serving.http.front import caller_of
from serving.settings import Settings

router = APIRouter(prefix="/weir")


class ReplicaView(BaseModel):
    replica: str
    model: str
    version: str
    base_url: str | None  # None for a tenant's key
    healthy: bool
    local: bool | None  # None for a tenant's key
    pid: int | None  # the engine's guard process (local engines); None for a tenant's key
    restarts: int
    breaker: str  # closed | open | half_open
    breaker_trips: int
    outstanding: int
    requests: int
    # where it runs (local engines, full view): gpus + memory_fraction, or cpus + OpenMP
    placement: dict[str, Any] | None = None


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


def _admin(request: Request) -> bool:
    """Whether the bearer is the admin key (compared in constant time)."""
    settings: Settings = request.app.state.settings
    admin = settings.keys.admin_key
    if admin is None:
        return False
    scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return False
    return hmac.compare_digest(token.encode(), admin.get_secret_value().encode())


def _full_view(request: Request) -> bool:
    caller = caller_of(request.scope)
    no_key = caller.key is None and caller.static_key is None  # keys off (or the admin key)
    return _admin(request) or (no_key and not _keys_required(request))


def _keys_required(request: Request) -> bool:
    settings: Settings = request.app.state.settings
    return settings.keys.enabled or bool(settings.gateway.api_keys)


@router.get("/engines", summary="Engine replicas, their health and load")
async def list_engines(proxy: ProxyDep, request: Request) -> EngineList:
    dispatcher = proxy.dispatcher
    full = _full_view(request)
    caller = caller_of(request.scope)
    bulkheads = [
        BulkheadView(
            version=str(key), in_flight=b.in_flight, queued=b.queued,
            max_in_flight=b.max_in_flight, max_queue=b.max_queue, rejected=b.rejected,
        )
        for key, b in dispatcher.bulkheads().items()
        if full or caller.allows(key.model)
    ]  # fmt: skip
    views = []
    for r in dispatcher.fleet.replicas:
        if not full and not caller.allows(r.key.model):
            continue
        load = dispatcher.load_of(r)
        views.append(
            ReplicaView(
                replica=str(r.key),
                model=r.key.model,
                version=r.key.version,
                base_url=getattr(r.engine, "base_url", None) if full else None,
                healthy=r.healthy,
                local=(r.process is not None) if full else None,
                pid=r.process.pid if full and r.process else None,
                restarts=r.restarts,
                breaker=load.breaker.state,
                breaker_trips=load.breaker.trips,
                outstanding=load.outstanding,
                requests=load.requests,
                placement=r.placement.view() if full and r.placement else None,
            )
        )
    return EngineList(data=views, bulkheads=bulkheads)
