"""The registry: public names, aliases and pinned versions, resolved to a served version.

``smollm2`` is an alias for the model's current version; ``smollm2@135m-instruct`` pins
a version. The registry knows names only: which replicas serve a version is the fleet's.
"""

from __future__ import annotations

from collections.abc import Iterable

from models.config import ModelConfig
from models.errors import ConfigError, ModelNotFound
from models.types import ServedVersion

PIN = "@"


def split_name(name: str) -> tuple[str, str]:
    """``smollm2@v1`` to ``("smollm2", "v1")``; an unpinned name has version ``""``."""
    base, _, pinned = name.partition(PIN)
    return base, pinned


class Registry:
    def __init__(self, models: Iterable[ModelConfig]) -> None:
        self._models: dict[str, ModelConfig] = {}
        for model in models:
            if model.name in self._models:
                raise ConfigError(f"model '{model.name}' is configured twice")
            self._models[model.name] = model
        self._fallbacks = {
            m.name: [self._fallback(m, f) for f in m.fallbacks] for m in self._models.values()
        }

    def _fallback(self, model: ModelConfig, name: str) -> ServedVersion:
        try:
            target = self.resolve(name)
        except ModelNotFound:
            raise ConfigError(f"model '{model.name}': fallback '{name}' is not served") from None
        if target.task != model.task:
            raise ConfigError(
                f"model '{model.name}': fallback '{name}' is not a {model.task} model"
            )
        if target.model == model.name and target.version == model.current:
            raise ConfigError(f"model '{model.name}': falls back to itself")
        return target

    def __repr__(self) -> str:
        return f"Registry(models={list(self._models)!r})"

    @property
    def models(self) -> list[ModelConfig]:
        return list(self._models.values())

    def resolve(self, name: str) -> ServedVersion:
        """``name`` or ``name@version`` to the version that serves it; ``ModelNotFound``."""
        base, pinned = split_name(name)
        model = self._models.get(base)
        if model is None:
            raise ModelNotFound(name)
        version = pinned or model.current
        if all(v.version != version for v in model.versions):
            raise ModelNotFound(name)
        return ServedVersion(model=model.name, version=version, task=model.task)

    def fallbacks(self, model: str) -> list[ServedVersion]:
        """The versions to try, in order, when ``model``'s own cannot take a request."""
        return self._fallbacks.get(model, [])

    def served_versions(self) -> list[ServedVersion]:
        return [
            ServedVersion(model=m.name, version=v.version, task=m.task)
            for m in self._models.values()
            for v in m.versions
        ]
