"""Rollouts recorded in a JSON file, so a restarted gateway serves what was deployed.

Per model: ``current``, ``split``, the running versions, the previous version (for
``weir rollback``) and versions added at runtime (with their weights). At start the
recorded state is laid over the configuration; a record naming a version the
configuration no longer has is ignored with a warning.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from models.config import ModelConfig, VersionConfig
from models.registry import Registry

log = logging.getLogger("weir.rollout")


class RolloutState:
    def __init__(self, path: Path) -> None:
        self.path = path.expanduser()
        self.previous: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"RolloutState(path={str(self.path)!r})"

    def load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.error("rollout state %s unreadable (%s); starting from the configuration",
                      self.path, exc)  # fmt: skip
            return {}
        return data if isinstance(data, dict) else {}

    def apply(self, models: list[ModelConfig]) -> list[ModelConfig]:
        """``models`` with each recorded rollout laid over its configuration."""
        recorded = self.load()
        out: list[ModelConfig] = []
        for model in models:
            record = recorded.get(model.name)
            if not isinstance(record, dict):
                out.append(model)
                continue
            try:
                out.append(_overlay(model, record))
                if record.get("previous"):
                    self.previous[model.name] = str(record["previous"])
            except ValueError as exc:
                log.warning("ignoring recorded rollout of %s: %s", model.name, exc)
                out.append(model)
        return out

    def save(self, registry: Registry, previous: dict[str, str]) -> None:
        data: dict[str, Any] = {}
        for model in registry.models:
            data[model.name] = {
                "current": model.current,
                "split": model.split,
                "running": registry.running(model.name),
                "previous": previous.get(model.name),
                "versions": [v.model_dump(mode="json") for v in model.versions],
            }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(data, indent=2))
        os.replace(partial, self.path)


def _overlay(model: ModelConfig, record: dict[str, Any]) -> ModelConfig:
    known = {v.version: v for v in model.versions}
    for raw in record.get("versions") or []:
        version = VersionConfig.model_validate(raw)
        known.setdefault(version.version, version)  # the configuration wins for known ones
    running = set(record.get("running") or [])
    if not running <= set(known):
        raise ValueError(f"running versions {sorted(running - set(known))} are not configured")
    versions = [v.model_copy(update={"standby": v.version not in running}) for v in known.values()]
    return ModelConfig.model_validate(
        {
            **model.model_dump(),
            "versions": [v.model_dump() for v in versions],
            "current": record.get("current", model.current),
            "split": record.get("split") or {},
        }
    )
