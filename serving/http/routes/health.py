"""``/healthz`` (the process answers) and ``/readyz`` (every model has a healthy engine)."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from serving.http.deps import FleetDep
from serving.http.rendering import JSONBytes

router = APIRouter()


class Liveness(BaseModel):
    status: str = "ok"


@router.get("/healthz", summary="Liveness")
async def healthz() -> Liveness:
    return Liveness()


@router.get("/readyz", summary="Readiness: every served version has a healthy engine")
async def readyz(fleet: FleetDep) -> JSONBytes:
    versions = fleet.readiness()
    ready = all(versions.values())
    body = {"status": "ready" if ready else "not_ready", "versions": versions}
    return JSONBytes(body, status_code=200 if ready else 503)
