"""The planner's entry points: a plan for what starts with the gateway, and a deploy plan
for a new version beside what runs. Pure functions of the host and the specs."""

from __future__ import annotations

from collections.abc import Sequence

from models.engines.placement import cpu, gpu
from models.engines.placement.types import (
    DeployPlan,
    EngineSpec,
    GpuHost,
    Host,
    Placement,
)
from models.types import VersionKey


def plan(
    host: Host, specs: Sequence[EngineSpec], *, running: Sequence[Placement] = (),
    cap: float = gpu.CAP,
) -> tuple[Placement, ...]:  # fmt: skip
    """Devices for every replica of ``specs`` (in order); ``PlacementRefused`` with the
    numbers when they do not fit."""
    if isinstance(host, GpuHost):
        return gpu.plan(host, specs, running=running, cap=cap)
    return cpu.plan(host, specs, running=running)


def plan_deploy(
    host: Host,
    spec: EngineSpec,
    running: Sequence[Placement],
    replacing: VersionKey | None,
    *,
    cap: float = gpu.CAP,
) -> DeployPlan:
    """Where the new version ``spec`` goes while ``running`` keeps serving.

    GPU hosts: free memory beside the running engines, else a rolling swap over the
    replicas of ``replacing``, else ``PlacementRefused``. CPU hosts: always beside, on
    the cores the running engines weigh least."""
    if isinstance(host, GpuHost):
        old = [p for p in running if p.replica.version_key == replacing]
        return gpu.deploy(host, spec, running, old, cap=cap)
    return DeployPlan(
        "beside", cpu.plan(host, [spec], running=running, replacing=replacing, headroom=False)
    )
