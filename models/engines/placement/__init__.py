"""Placement: which GPUs (and how much of their memory) or which cores each engine gets.

``types`` holds the values, ``plan`` the pure planner (``gpu`` and ``cpu`` do the work
for each kind of host), ``discover`` reads the real host. See each module's docstring.
"""

from models.engines.placement.plan import plan, plan_deploy
from models.engines.placement.types import (
    CpuHost,
    DeployPlan,
    EngineSpec,
    Gpu,
    GpuHost,
    Host,
    Placement,
    PlacementRefused,
    SwapStep,
)

__all__ = [
    "CpuHost",
    "DeployPlan",
    "EngineSpec",
    "Gpu",
    "GpuHost",
    "Host",
    "Placement",
    "PlacementRefused",
    "SwapStep",
    "plan",
    "plan_deploy",
]
