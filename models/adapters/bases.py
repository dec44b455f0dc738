"""Which base version an adapter targets: ``MODEL`` (its current version) or
``MODEL@VERSION``, from the configuration, with its weights' directory."""

from __future__ import annotations

from models.adapters.store import Base
from models.config import ModelConfig, StoreConfig
from models.errors import ConfigError
from models.registry import split_name
from models.store import ModelStore


def base_for(models: list[ModelConfig], spec: str, store: StoreConfig) -> Base:
    """``ConfigError`` (or ``StoreError`` for weights not in the store) saying why not."""
    name, pinned = split_name(spec)
    model = next((m for m in models if m.name == name), None)
    if model is None:
        known = ", ".join(m.name for m in models)
        raise ConfigError(f"no model '{name}' is configured (configured: {known})")
    if model.task != "chat":
        raise ConfigError(f"'{name}' is an embedding model; adapters go on chat models")
    version = model.version(pinned or model.current)
    if version.weights is None:
        raise ConfigError(
            f"{name}@{version.version} is a remote engine: Weir loads adapters only into"
            " engines it starts (from weights)"
        )
    weights = ModelStore(store.root).resolve(version.weights)
    return Base(model.name, version.version, weights, version.max_lora_rank)
