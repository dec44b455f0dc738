"""The adapter service for a gateway, when a configured version has LoRA on."""

from __future__ import annotations

from collections.abc import Callable

import aiohttp
from prometheus_client import CollectorRegistry

from models.adapters.store import AdapterStore
from models.config import ModelConfig
from models.engines.fleet import Fleet
from models.registry import Registry
from serving.adapters.control import AdapterControl, HttpAdapterControl
from serving.adapters.metrics import AdapterMetrics
from serving.adapters.service import AdapterService, lora_versions
from serving.rollout.tracker import VersionTracker

ControlFactory = Callable[[aiohttp.ClientSession], AdapterControl]


def make_adapters(
    models: list[ModelConfig],
    store: AdapterStore,
    registry: Registry,
    fleet: Fleet,
    session: aiohttp.ClientSession,
    tracker: VersionTracker,
    metrics: CollectorRegistry | None,
    control: ControlFactory | None = None,
) -> AdapterService | None:
    """None when no version starts its engines with LoRA on."""
    if not lora_versions(models):
        return None
    return AdapterService(
        registry,
        fleet,
        store,
        control(session) if control is not None else HttpAdapterControl(session),
        tracker=tracker,
        metrics=AdapterMetrics.create(metrics) if metrics is not None else None,
    )
