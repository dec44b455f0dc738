"""``GET /metrics``: the gateway's Prometheus metrics (never the engines' ``vllm:*``)."""

from __future__ import annotations

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from serving.errors import RouteNotFound
from serving.http.deps import ProxyDep
from serving.observe.metrics import BREAKER_STATES

router = APIRouter()


@router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
async def metrics(proxy: ProxyDep) -> Response:
    found = proxy.metrics
    if found is None:
        raise RouteNotFound("Metrics are off (observability.metrics = false).")
    healthy: dict[tuple[str, str], int] = {}
    dispatcher = proxy.dispatcher
    for replica in dispatcher.fleet.replicas:
        key = (replica.key.model, replica.key.version)
        healthy[key] = healthy.get(key, 0) + int(replica.healthy)
        state = dispatcher.load_of(replica).breaker.state
        found.breaker.labels(str(replica.key)).set(BREAKER_STATES[state])
    for (model, version), count in healthy.items():
        found.healthy.labels(model, version).set(count)
    return Response(found.exposition(), media_type=CONTENT_TYPE_LATEST)
