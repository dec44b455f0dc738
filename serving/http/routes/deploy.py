"""``/weir/admin/models/{model}/...``: deploy, canary, rollback and split at runtime.

A deploy or rollback is checked before the answer (a refusal is a 4xx with the reasons
and changes nothing), then runs in the background: the answer is ``202`` with the
operation, and ``GET .../deployment`` shows its progress and outcome.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from serving.protocol.admin import DeploymentStatus
from serving.rollout.deployer import Deployer
from serving.rollout.operation import DeployRequest

router = APIRouter(prefix="/weir/admin/models")


class DeployBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str = Field(min_length=1, max_length=64)
    canary: float | None = Field(None, gt=0, lt=100, description="percent to the new version")
    weights: str | None = Field(None, description="store entry or directory, for a new version")
    urls: list[str] = Field([], max_length=64, description="remote engines, for a new version")
    engine_args: list[str] | None = None
    replicas: int | None = Field(None, ge=1, le=64)
    promote_if: str | None = Field(None, max_length=200, examples=["ttft_p95<1.2x,errors<1%"])
    window_s: float = Field(300.0, gt=0, le=7 * 86400)
    min_requests: int | None = Field(None, ge=1)


class SplitBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    split: dict[str, float] = Field(min_length=1, description="running version -> weight")


def _deployer(request: Request) -> Deployer:
    deployer: Deployer = request.app.state.deployer
    return deployer


@router.post("/{model}/deploy", status_code=202, summary="Deploy a version (or a canary)")
async def deploy(model: str, body: DeployBody, request: Request) -> DeploymentStatus:
    deployer = _deployer(request)
    await deployer.deploy(model, DeployRequest(**body.model_dump()))
    return DeploymentStatus.model_validate(deployer.status(model))


@router.post("/{model}/rollback", status_code=202, summary="Back to the previous version")
async def rollback(model: str, request: Request) -> DeploymentStatus:
    deployer = _deployer(request)
    await deployer.rollback(model)
    return DeploymentStatus.model_validate(deployer.status(model))


@router.put("/{model}/split", summary="Change the split among running versions")
async def split(model: str, body: SplitBody, request: Request) -> DeploymentStatus:
    return DeploymentStatus.model_validate(await _deployer(request).set_split(model, body.split))


@router.get("/{model}/deployment", summary="Versions, split and the last rollout's progress")
async def deployment(model: str, request: Request) -> DeploymentStatus:
    return DeploymentStatus.model_validate(_deployer(request).status(model))
